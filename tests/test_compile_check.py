"""The deviceless compile check: its HLO reading, spec tables, fit test and batch search; real compiles for a TPU
slice and for GPUs where their compilers are installed (CI installs both)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from densenet_jax.compile_check import check, hlo, search, specs, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_compiler(platform):
  """Skips where the platform's compiler is not installed; CI installs both and must not skip."""
  return pytest.mark.skipif(not targets.compiler_installed(platform) and not os.environ.get('CI'),
                            reason=targets.INSTALL[platform])


needs_libtpu, needs_cuda_plugin = needs_compiler('tpu'), needs_compiler('gpu')

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


@pytest.mark.parametrize('groups, size', [('{{0,1,2,3}}', 4), ('[16,4]<=[64]', 4), ("mesh['data'=64] {'data'}", 64),
                                           ("mesh['data'=64] {'data':(4)16}", 16), ("mesh['x'=4,'y'=8] {'y'}", 8)])
def test_replica_group_sizes(groups, size):
  instruction = hlo.Instr('ar', 'f32[8]', 'all-reduce', f'%x), replica_groups={groups}, to_apply=%add')
  assert hlo.group_size(instruction, 64) == size


def test_all_reduce_hops_on_a_torus():
  assert specs.torus_dims('v5p:4x4x4') == (4, 4, 4) and specs.torus_dims('v5e:2x4') == (2, 4)
  assert specs.all_reduce_hops(64, (4, 4, 4)) == 18  # the whole slice: 2 x (3 + 3 + 3)
  assert specs.all_reduce_hops(16, (4, 4, 4)) == 12  # a 4x4x1 plane
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


def test_spec_tables():
  assert specs.tpu('v5') is specs.tpu('v5p')
  assert all(chip.source.startswith('https://cloud.google.com/tpu/docs/') for chip in specs.TPUS)
  with pytest.raises(ValueError, match='v5p'):
    specs.tpu('v9')
  for gpu in specs.GPUS:  # every GPU has a target config that describes it, with its memory
    config = gpu.target_config()
    assert f'device_description_str: "{gpu.device_kind}"' in config
    assert f'device_memory_size: {int(gpu.hbm_bytes)}' in config
  assert specs.gpu('H100').device_kind == 'NVIDIA H100 80GB HBM3'
  with pytest.raises(ValueError, match='rtx4090'):
    specs.gpu('v100')


def test_gpu_names():
  assert targets.parse_gpus('a100-80gb')[1:] == (1, 1)
  assert targets.parse_gpus('h100:8')[1:] == (1, 8) and targets.parse_gpus('h100:2x8')[1:] == (2, 8)
  for bad in ('h100:eight', 'h100:0', 'h100:2x'):
    with pytest.raises(ValueError, match='h100'):
      targets.parse_gpus(bad)


def test_a_step_over_the_devices_memory_is_refused_with_the_fixes():
  chip = specs.tpu('v5e')
  run = {'chip': {'name': 'v5e', 'hbm_bytes': chip.hbm_bytes}, 'unit': 'chip', 'batch_size': 256,
         'layout': {'chips': 4},
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


def tool_environment():
  """The tests' environment without what conftest.py set for computing on this CPU: the tool sets its own
  JAX_PLATFORMS, and the XLA:CPU flags would make XLA:GPU and XLA:TPU refuse memory_efficient's programs."""
  return {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}


def run_tool(tmp_path, target, dataset, batch_size, *flags):
  config = tmp_path / 'tiny.py'
  eval_split = 'validation' if dataset == 'imagenet2012' else 'test'
  config.write_text(TINY_CONFIG.format(dataset=dataset, eval_split=eval_split, batch_size=batch_size))
  report = tmp_path / 'report.json'
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.compile_check', f'--config={config}',
       f'--gpu={target[4:]}' if target.startswith('gpu:') else f'--topology={target}',
       f'--json={report}', *flags], cwd=ROOT, env=tool_environment(), capture_output=True, text=True, timeout=600)
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


def searched(peak, start=64, step=8, limit=65536):
  tried = []

  def recorded(n):
    tried.append(n)
    return peak(n)

  return search.largest_batch(recorded, start=start, step=step, limit=limit), tried


def test_the_batch_search_follows_the_line_of_peak_memory():
  # Peak memory a fixed part (parameters, optimizer state, code: a few percent) plus a part per image: the start,
  # one or two predictions and one step more.
  for fixed, per_image, start in ((0.01, 1e-4, 64), (0.03, 2e-5, 256), (0.0, 0.3, 8), (0.05, 0.004, 4096)):

    def peak(n, fixed=fixed, per_image=per_image):
      return fixed + per_image * n

    batch, tried = searched(peak, start=start)
    assert batch == max((n for n in range(8, 65537, 8) if peak(n) <= 1), default=0), (fixed, per_image, tried)
    assert len(tried) <= 4, (fixed, per_image, tried)


def test_the_batch_search_finds_the_largest_where_the_line_misleads():
  cases = {
      'fits or not': lambda largest: lambda n: 0.5 if n <= largest else 2.0,
      'refused above': lambda largest: lambda n: n / (1.5 * largest) if n <= largest else None,
      'rematerialized': lambda largest: lambda n: min(n / (0.7 * largest), 0.99) if n <= largest else 1.3,
      'refused at once': lambda largest: lambda n: 0.9 if n <= largest else None,
      'mostly fixed': lambda largest: lambda n: 0.3 + 0.7 * n / largest,
      # XLA:GPU plans to about 76% of the memory until rematerialization no longer keeps it there.
      'planned to a limit': lambda largest: lambda n: 0.76 + 1e-7 * n if n <= largest else 1.3 + n / largest,
  }
  for name, make in cases.items():
    for largest in (3, 8, 100, 513, 4000, 10**6):
      batch, tried = searched(make(largest))
      assert batch == min(largest // 8 * 8, 65536), (name, largest, tried)
      assert len(tried) == len(set(tried)) <= 3 * 14, (name, largest, tried)


@needs_cuda_plugin
def test_tiny_model_compiles_for_two_gpus(tmp_path):
  result, run = run_tool(tmp_path, 'gpu:h100:2', 'cifar10', 8)
  assert result.returncode == 0, result.stderr[-3000:]
  assert run['layout'] == {'devices': 2, 'chips': 2, 'hosts': 1, 'slices': 1} and run['unit'] == 'GPU'
  assert run['form']['kernels'] == 'xla'  # the GPU's form, not this CPU's
  train, evaluate = run['steps']['train'], run['steps']['eval']
  assert 0 < train['memory']['peak_per_chip'] < 0.001 * run['chip']['hbm_bytes'] and train['memory']['alias'] > 0
  # XLA:GPU has no cost analysis: FLOPs from the program before optimization, bytes from its kernels.
  assert train['flops_per_chip'] > evaluate['flops_per_chip'] > 0
  assert train['bytes_per_chip'] > evaluate['bytes_per_chip'] > 0
  # Convolutions run as cuDNN calls, forward and both gradients; the rest in fusions.
  kernels = train['kernels']
  assert kernels['cuDNN convForward'] >= 7 and kernels['cuDNN convBackwardFilter'] >= 7
  assert kernels['fusion'] > 20 and 'cuDNN convBackwardFilter' not in evaluate['kernels']
  assert train['collectives']['all-reduce']['group_sizes'] == [2]
  assert 'img/s per GPU' in result.stdout and 'cuDNN convForward' in result.stdout


@needs_cuda_plugin
def test_a_batch_over_the_gpus_memory_exits_1_with_the_fixes(tmp_path):
  # 224x224 images through a stride-1 stem, 8192 per GPU: about 50 GB of temporaries for a 24 GB RTX 4090.
  result, run = run_tool(tmp_path, 'gpu:rtx4090', 'imagenet2012', 8192, '--steps=train')
  assert result.returncode == 1, result.stderr[-3000:]
  assert run['steps']['train']['memory']['fraction_of_hbm'] > 1
  assert 'Does not fit: The train step needs' in result.stderr and 'RTX 4090' not in result.stderr
  assert 'of a rtx4090 GPU, at batch 8192 per GPU' in result.stderr and '--max_batch' in result.stderr


@needs_cuda_plugin
def test_the_largest_batch_search_compiles_each_form(tmp_path):
  config = tmp_path / 'tiny.py'
  # About 6 MB per 224x224 image through a stride-1 stem: between 2048 and 4096 fit a 22.5 GiB L4. A coarse
  # resolution keeps it to three compiles: 2048 and 3072 fit, 4096 does not.
  config.write_text(TINY_CONFIG.format(dataset='imagenet2012', eval_split='validation', batch_size=2048))
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.compile_check', f'--config={config}', '--gpu=l4', '--max_batch',
       '--forms=memory_efficient', '--batch_resolution=1024', f'--json={tmp_path / "search.json"}'], cwd=ROOT,
      env=tool_environment(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads((tmp_path / 'search.json').read_text())['memory_efficient']
  assert found['batch_per_device'] == 3072
  assert found['run']['steps']['train']['memory']['fraction_of_hbm'] <= 1
  assert 'memory_efficient: 3072 per GPU, ' in result.stdout and 'of its memory: fits' in result.stdout
  assert 'memory_efficient: 4096 per GPU, ' in result.stdout


def temp_bytes_on_an_h100(models: str) -> list[int]:
  """The train-step temporaries, compiled for an H100, of each model that the code `models` prints as
  `temp(model)` (it may import from densenet_jax.model and use jnp)."""
  script = (
      'from densenet_jax import compile_check\n'
      'compile_check.set_environment()\n'
      'import jax.numpy as jnp\n'
      'from densenet_jax import memory\n'
      'from densenet_jax.compile_check import targets\n'
      'device = targets.gpus("h100").devices[0]\n'
      'temp = lambda model, batch, image: print(memory.train_step_temp_bytes(model, batch, image, device=device))\n'
      + models)
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=tool_environment(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [int(line) for line in result.stdout.split()]


@needs_cuda_plugin
def test_memory_efficient_recomputes_layers_and_stem_on_a_gpu():
  unrolled, memory_efficient = temp_bytes_on_an_h100("""
from densenet_jax.model import imagenet_densenet
for memory_efficient in (False, True):
  temp(imagenet_densenet((2, 4), 16, num_classes=10, memory_efficient=memory_efficient, dtype=jnp.bfloat16), 32,
       (224, 224, 3))
""")
  # Keeping each layer's bottleneck output and the stem's activations, as Pleiss et al. do, left this small
  # DenseNet 0.93x of the unrolled temporaries on an H100; recomputing them 0.74x.
  assert memory_efficient < 0.8 * unrolled, (unrolled, memory_efficient)


@needs_cuda_plugin
def test_memory_efficient_sums_gradients_layer_by_layer_on_a_gpu():
  summed, at_the_block_start = temp_bytes_on_an_h100("""
from densenet_jax.model import imagenet_densenet, layers
model = imagenet_densenet((16,), 32, num_classes=10, memory_efficient=True, dtype=jnp.bfloat16)
temp(model, 32, (56, 56, 3))
layers.sum_gradients_here = lambda features: features
temp(model, 32, (56, 56, 3))
""")
  # One block of 16 layers: 0.77x; XLA left alone keeps every layer's input gradient until the block's start.
  assert summed < 0.85 * at_the_block_start, (summed, at_the_block_start)


CODE_GENERATION_ON_A_GPU = """
from densenet_jax import compile_check
compile_check.set_environment()
import jax, jax.numpy as jnp, optax
from densenet_jax.compile_check import check, hlo, targets
from densenet_jax.model import cifar_densenet
sharding = jax.sharding.SingleDeviceSharding(targets.gpus('h100').devices[0])
model = cifar_densenet(16, 4, bottleneck=True, compression=0.5, num_classes=10, dtype=jnp.bfloat16)
images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32, sharding=sharding)
variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding),
                         jax.eval_shape(model.init, jax.random.key(0), images))
def loss(params, variables, images):
  logits, _ = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(64, jnp.int32)).mean()
lowered = jax.jit(jax.grad(loss)).lower(variables['params'], variables, images)
for options in (None, check.GPU_CODEGEN_UNOPTIMIZED):
  compiled = lowered.compile(options)
  memory, stats = compiled.memory_analysis(), hlo.analyze(compiled.as_text())
  print(memory.temp_size_in_bytes, memory.argument_size_in_bytes, memory.output_size_in_bytes,
        stats.kernel_bytes, sorted(stats.kernels.items()))
"""


@needs_cuda_plugin
def test_unoptimized_gpu_code_generation_changes_no_reported_figure():
  result = subprocess.run([sys.executable, '-c', CODE_GENERATION_ON_A_GPU], cwd=ROOT, env=tool_environment(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  optimized, unoptimized = result.stdout.splitlines()
  assert optimized == unoptimized and 'cuDNN convForward' in optimized
