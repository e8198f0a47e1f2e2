"""The deviceless TPU compile check: its HLO reading, spec table and fit test; a real compile when libtpu is here."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from densenet_jax.tpu_compile import check, hlo, specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not check.libtpu_available(),
                                  reason='libtpu is not installed (pip install -r requirements-tpu.txt)')

# The shape of XLA:TPU's output: a while whose trip count is only in its condition (i < 5 from i = 1, so 4
# trips), a convolution and an all-reduce inside the body, one all-reduce outside.
LOOP_HLO = textwrap.dedent("""\
    HloModule step, num_partitions=4

    %body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
      %p = (s32[], f32[8,16]) parameter(0)
      %i = s32[] get-tuple-element(%p), index=0
      %x = f32[8,16] get-tuple-element(%p), index=1
      %one = s32[] constant(1)
      %next = s32[] add(%i, %one)
      %w = f32[16,16] constant({...})
      %y = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
      %s = f32[8,16] all-reduce(%y), replica_groups=[1,4]<=[4], to_apply=%add
      ROOT %t = (s32[], f32[8,16]) tuple(%next, %s)
    }

    %cond (q: (s32[], f32[8,16])) -> pred[] {
      %q = (s32[], f32[8,16]) parameter(0)
      %j = s32[] get-tuple-element(%q), index=0
      %n = s32[] constant(5)
      ROOT %lt = pred[] compare(%j, %n), direction=LT
    }

    ENTRY %main (a: f32[8,16]) -> f32[8,16] {
      %a = f32[8,16] parameter(0)
      %start = s32[] constant(1)
      %init = (s32[], f32[8,16]) tuple(%start, %a)
      %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
      %out = f32[8,16] get-tuple-element(%loop), index=1
      ROOT %r = f32[8,16] all-reduce(%out), replica_groups=mesh['data'=4] {'data'}, to_apply=%add
    }
    """)


def test_all_reduce_hops_on_a_torus():
  assert specs.torus_dims('v5p:4x4x4') == (4, 4, 4) and specs.torus_dims('v5e:2x4') == (2, 4)
  assert specs.all_reduce_hops(64, (4, 4, 4)) == 18  # the whole slice: 2 x (3 + 3 + 3)
  assert specs.all_reduce_hops(2, (4, 4, 4)) == 2  # a pair of chips
  assert specs.all_reduce_hops(1, (4, 4, 4)) == 0
  with pytest.raises(ValueError, match='chip grid'):
    specs.torus_dims('v5p:big')


def test_loop_trips_weight_matmul_flops_and_collectives():
  stats = hlo.analyze(LOOP_HLO)
  assert stats.loops == [{'name': 'loop', 'trip_count': 4}]
  dot = 2 * 8 * 16 * 16
  assert (stats.matmul_flops_once, stats.matmul_flops) == (dot, 4 * dot)
  reduce = stats.collectives['all-reduce']
  assert (reduce['ops'], reduce['executions'], reduce['group_sizes']) == (2, 5, [4])
  assert reduce['executions_by_group_size'] == {4: 5}
  # In sequence on a 2x2 torus: 5 all-reduces of 2 x (1 + 1) hops each.
  latency = check.collective_latency(stats.collectives, specs.torus_dims('v5e:2x2'))
  assert (latency['all_reduces_per_step'], latency['hops_per_step']) == (5, 20)
  assert latency['latency_s'] == 20 * specs.ICI_HOP_LATENCY_S
  assert reduce['bytes'] == 5 * 8 * 16 * 4
  assert stats.loop_extra_bytes > 0


def test_spec_table():
  assert specs.by_generation('v5') is specs.by_generation('v5p')
  assert specs.by_device_kind('TPU v5 lite').generation == 'v5e'
  assert all(chip.source.startswith('https://cloud.google.com/tpu/docs/') for chip in specs.CHIPS)
  with pytest.raises(ValueError, match='v5p'):
    specs.by_generation('v9')


def test_a_step_over_the_chips_hbm_is_refused_with_the_fixes():
  chip = specs.by_generation('v5e')
  run = {'chip': {'generation': 'v5e', 'hbm_bytes': chip.hbm_bytes}, 'batch_size': 256, 'layout': {'chips': 4},
         'steps': {'train': {'memory': {'peak_per_chip': 2 * chip.hbm_bytes, 'fraction_of_hbm': 2.0}}}}
  with pytest.raises(check.DoesNotFitError, match='batch 64 per chip.*gradient_accumulation_steps'):
    check.check_fits(run)
  run['steps']['train']['memory'].update(peak_per_chip=chip.hbm_bytes / 2, fraction_of_hbm=0.5)
  check.check_fits(run)


TINY_CONFIG = """
import ml_collections
from densenet_jax import config as base

def get_config():
  config = base.get_config()
  config.model = 'cifar_densenet'
  config.architecture = ml_collections.ConfigDict(dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5))
  config.dataset = {dataset!r}
  config.eval_split = {eval_split!r}
  config.batch_size = {batch_size}
  config.dtype = 'bfloat16'
  return config
"""


def run_tool(tmp_path, topology, dataset, batch_size, *flags):
  config = tmp_path / 'tiny.py'
  eval_split = 'validation' if dataset == 'imagenet2012' else 'test'
  config.write_text(TINY_CONFIG.format(dataset=dataset, eval_split=eval_split, batch_size=batch_size))
  report = tmp_path / 'report.json'
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}  # the tool sets its own
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.tpu_compile', f'--config={config}', f'--topology={topology}',
       f'--json={report}', *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return result, (json.loads(report.read_text()) if report.exists() else None)


@needs_libtpu
def test_tiny_model_compiles_for_a_v5e_slice(tmp_path):
  result, run = run_tool(tmp_path, 'v5e:2x2', 'cifar10', 8)
  assert result.returncode == 0, result.stderr[-3000:]
  assert run['layout'] == {'devices': 4, 'chips': 4, 'hosts': 1, 'slices': 1}
  assert set(run['steps']) == {'train', 'eval'}
  train = run['steps']['train']
  assert 0 < train['memory']['peak_per_chip'] < 0.01 * run['chip']['hbm_bytes']
  assert train['memory']['alias'] > 0  # the state is donated, as loop.py does
  assert train['flops_per_chip'] > run['steps']['eval']['flops_per_chip'] > 0
  assert train['roofline']['images_per_second_per_chip'] > 0
  # Data parallel over 4 chips: gradients and the statistics of every BatchNorm are all-reduced over all 4.
  assert train['collectives']['all-reduce']['group_sizes'] == [4]
  assert train['collectives']['all-reduce']['ops'] > 30
  assert train['all_reduces']['all_reduces_per_step'] > 30 and train['roofline']['collective_latency_s'] > 0
  assert 'train step' in result.stdout and 'img/s per chip' in result.stdout


@needs_libtpu
def test_batch_norm_groups_of_the_per_chip_batch_need_no_statistics_all_reduce(tmp_path):
  result, run = run_tool(tmp_path, 'v5e:2x2', 'cifar10', 8, '--steps=train', '--config.batch_norm_group_size=2')
  assert result.returncode == 0, result.stderr[-3000:]
  # Each chip normalizes with its own statistics: what is left is the gradient all-reduce and the running averages
  # (the mean of the groups' statistics), which XLA combines; nothing on the path of the normalization.
  assert run['steps']['train']['collectives']['all-reduce']['ops'] <= 2
  assert run['steps']['train']['all_reduces']['all_reduces_per_step'] <= 2
  assert 'all-reduces in sequence' in result.stdout


@needs_libtpu
def test_step_over_hbm_on_a_two_host_slice_exits_1(tmp_path):
  # 224x224 images through a stride-1 stem, 4096 per chip: about 25 GB of temporaries per 16 GB v5e chip. XLA:TPU
  # fits temporaries to HBM where it can (at 2048 per chip it compiles, using 94% of it) and refuses this one.
  result, run = run_tool(tmp_path, 'v5e:2x4', 'imagenet2012', 8 * 4096, '--steps=train')
  assert result.returncode == 1, result.stderr[-3000:]
  assert run is None
  assert 'Does not fit: The train step does not fit' in result.stderr
  assert '8 chips on 2 hosts, batch 4096 per chip' in result.stderr and 'memory_efficient' in result.stderr
