"""The benchmark scripts run, measure what they say, and check what they compare."""

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from densenet_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import bench  # noqa: E402
import block_forms  # noqa: E402
import compile_parts  # noqa: E402
import kernel_ops  # noqa: E402
from benchmarks import common, machine_load  # noqa: E402
from benchmarks import host_memory as host_memory_benchmark  # noqa: E402
from densenet_jax.platform import host_memory  # noqa: E402

TINY_MODEL = ['--model', 'tiny', '--batch', '2', '--image_size', '8']
TINY = [*TINY_MODEL, '--steps', '1', '--rounds', '2']


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
  # A DenseNet-BC with two layers per block: the scripts' code paths at a fraction of the compile time.
  monkeypatch.setitem(model_lib.MODELS, 'tiny', functools.partial(model_lib.cifar_densenet, 16, 4, bottleneck=True,
                                                               compression=0.5))


def test_bench_against_pytorch_writes_the_promised_json(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'result.json'
  # A fresh process, as bench.py runs: PyPI's PyTorch loads its compiler stack (triton) in the optimizer, which
  # crashes beside TensorFlow's libraries, imported in this test process by other tests.
  # One thread count only: several PyTorch threads on cores that another test process keeps busy wait for each
  # other at every operation (a step of this tiny model took 14 s). The default counts are tested below.
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench.py'), '--model', 'densenet_l40_k12',
                         '--batch', '2', '--image_size', '8', '--steps', '1', '--rounds', '2', '--reference', 'torch',
                         '--torch_threads', '1', '--sweep_rounds', '1', '--sweep_steps', '1',
                         '--load_probe_seconds', '0.2', '--json', str(out)],
                        check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
  result = json.loads(out.read_text())
  for key in ('model', 'batch', 'image_size', 'dtype', 'memory_efficient', 'device', 'images_per_second',
              'compile_seconds', 'temp_bytes', 'eval_images_per_second', 'xla_flags', 'cpu_family', 'usable_cpus',
              'step_cpu_seconds'):
    assert key in result, key
  assert result['model'] == 'densenet_l40_k12' and result['image_size'] == 8 and result['temp_bytes'] > 0
  reference = result['reference']
  assert reference['implementation'].startswith('PyTorch') and reference['images_per_second'] > 0
  assert reference['eval_images_per_second'] > 0 and reference['step_cpu_seconds'] > 0
  assert not reference['checkpointing']
  # The thread counts asked for, then both memory formats at the fastest; the fastest kept.
  sweep = reference['sweep']
  by_threads, by_format = sweep['step_seconds_by_threads'], sweep['step_seconds_by_memory_format']
  assert list(by_threads) == ['1']
  assert sweep['threads'] == reference['torch_threads'] == int(min(by_threads, key=by_threads.get))
  assert set(by_format) == {'contiguous', 'channels_last'}
  assert sweep['memory_format'] == reference['memory_format'] == min(by_format, key=by_format.get)
  # The machine's load and each side's CPU use are reported; a ratio only without contention.
  assert set(result['cpu_utilization']) == {'jax_train', 'jax_eval', 'reference_train', 'reference_eval'}
  assert len(result['machine']['loadavg_before']) == 3 and result['machine']['others_during'] is not None
  if result['contention']['contended']:
    assert 'speedup_vs_reference' not in result and 'NO RATIO' in done.stderr
  else:
    assert result['speedup_vs_reference'] == pytest.approx(
        result['images_per_second'] / reference['images_per_second'], rel=0.02)
    assert result['eval_speedup_vs_reference'] == pytest.approx(
        result['eval_images_per_second'] / reference['eval_images_per_second'], rel=0.02)
    assert 'ratio train' in done.stdout


def test_pytorch_is_timed_with_every_thread_count_up_to_the_usable_cpus_unless_told():
  assert bench.sweep_thread_counts(None, 4) == (1, 2, 3, 4)
  assert bench.sweep_thread_counts((2, 1), 4) == (2, 1)
  assert bench.parse_args([*TINY, '--torch_threads', '1,2']).torch_threads == (1, 2)
  assert bench.parse_args(TINY).torch_threads is None
  for bad in ('0', 'two', ''):
    with pytest.raises(SystemExit):
      bench.parse_args([*TINY, '--torch_threads', bad])


# Builds the PyTorch reference exactly as bench.run does for a memory-efficient JAX model and counts how often
# each dense layer's first BatchNorm runs in one train step: once per layer, or twice if checkpointing recomputes.
_COUNT_RECOMPUTATION = """
import json, sys
sys.path.insert(0, 'benchmarks')
import bench
from densenet_jax import model as model_lib

class Built(Exception):
  pass

class CapturingRunner(bench.TorchRunner):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    raise Built(self)

model_lib.MODELS['tiny'] = lambda **kw: model_lib.cifar_densenet(16, 4, bottleneck=True, compression=0.5, **kw)
bench.TorchRunner = CapturingRunner
try:
  bench.run(bench.parse_args(['--model', 'tiny', '--batch', '2', '--image_size', '8', '--memory_efficient',
                              '--torch_threads', '1', '--sweep_rounds', '1', '--sweep_steps', '1',
                              '--load_probe_seconds', '0.1', '--dropout_rate', '0.2', '--reference', sys.argv[1]]))
except Built as built:
  runner = built.args[0]
layers = [m for name, m in runner.eager.named_modules() if name.endswith('norm1')]
calls = []
for layer in layers:
  layer.register_forward_hook(lambda *_: calls.append(1))
runner.train()
dropout = sorted({m.dropout_rate for m in runner.eager.modules() if hasattr(m, 'dropout_rate')})
print(json.dumps(dict(layers=len(layers), norm1_calls=len(calls), checkpointing=runner.checkpointing(), dropout=dropout)))
"""


@pytest.mark.parametrize('reference, forward_passes', [('torch', 1), ('torch_memory_efficient', 2)])
def test_the_pytorch_reference_recomputes_nothing_unless_asked_by_name(reference, forward_passes):
  pytest.importorskip('torch')
  # A fresh process: PyTorch's optimizer loads its compiler stack, which crashes beside TensorFlow (see above).
  done = subprocess.run([sys.executable, '-c', _COUNT_RECOMPUTATION, reference], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  counts = json.loads(done.stdout.splitlines()[-1])
  assert counts['layers'] == 6  # Three blocks of two bottleneck layers.
  assert counts['norm1_calls'] == forward_passes * counts['layers']
  assert counts['checkpointing'] == (forward_passes == 2)
  assert counts['dropout'] == [0.2]  # --dropout_rate reaches the reference's dense layers


def test_bench_measures_memory_efficient_against_the_plain_model():
  result = bench.run(bench.parse_args([*TINY, '--memory_efficient', '--reference', 'plain', '--skip_eval']))
  assert result['memory_efficient'] and 'memory_efficient=False' in result['reference']['implementation']
  # Rematerialization keeps less for the backward pass (conftest sets the XLA flag train.py sets).
  assert result['temp_bytes'] < result['reference']['temp_bytes']


def test_bench_refuses_a_reference_that_is_the_measured_model():
  with pytest.raises(SystemExit, match='--reference plain'):
    bench.run(bench.parse_args([*TINY, '--no-memory_efficient', '--reference', 'plain']))
  with pytest.raises(SystemExit, match='--reference unrolled'):
    bench.run(bench.parse_args([*TINY, '--memory_efficient', '--layers_per_scan', '0', '--reference', 'unrolled']))


def test_bench_measures_other_xla_options_against_the_defaults():
  options = json.dumps(common.YNNPACK_CONVOLUTIONS)
  result = bench.run(bench.parse_args([*TINY, '--reference', 'xla_options', '--xla_options', options, '--skip_eval']))
  assert result['reference']['implementation'].endswith(f'XLA options {options}')
  assert result['reference']['images_per_second'] > 0
  assert result['contention']['contended'] or result['speedup_vs_reference'] > 0


@pytest.mark.parametrize('arguments', [['--reference', 'xla_options'], ['--xla_options', '{}'],
                                       ['--reference', 'xla_options', '--xla_options', 'not json'],
                                       ['--reference', 'xla_options', '--xla_options', '[1]']])
def test_bench_refuses_xla_options_it_cannot_use(arguments, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args([*TINY, *arguments])
  assert '--xla_options' in capsys.readouterr().err


def test_bench_names_an_xla_option_the_compiler_refuses():
  args = bench.parse_args([*TINY, '--reference', 'xla_options', '--xla_options', '{"xla_no_such_option": 1}'])
  with pytest.raises(SystemExit, match='xla_no_such_option'):
    bench.run(args)


def test_all_block_forms_compute_the_same_function():
  # The straightforward concatenation, the preallocated buffer and the library's block: same loss and
  # gradients from the same parameters (run() raises otherwise), each timed and measured.
  args = block_forms.parse_args(['--batch', '2', '--size', '4', '--channels', '4', '--layers', '3',
                                 '--growth_rate', '2', '--repeats', '1'])
  result = block_forms.run(args)
  assert set(result['forms']) == set(block_forms.FORMS)
  assert all(form['seconds'] > 0 and form['temp_bytes'] > 0 for form in result['forms'].values())


def test_block_forms_catch_a_different_function():
  values = (1.0, [1.0, 2.0])
  block_forms._check_same('same', values, (1.0, [1.0, 2.0]))
  with pytest.raises(AssertionError, match=r'differs from the first form at \[1\]\[0\]'):
    block_forms._check_same('different', (1.0, [1.5, 2.0]), values)


@pytest.mark.parametrize('shapes, distinct', [([(5,), (5,), (5,)], 1), ([(5,), (6,), (7,)], 3)])
def test_kernel_counts_tell_distinct_kernels_apart(shapes, distinct):
  arrays = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  compiled = jax.jit(lambda arrays: [jnp.sin(a) * 2 + 1 for a in arrays]).lower(arrays).compile()
  assert compile_parts.kernel_counts(compiled.as_text()) == (3, distinct)


def test_compile_parts_measures_each_part_of_the_train_step(tmp_path):
  out = tmp_path / 'parts.json'
  compile_parts.main([*TINY_MODEL, '--json', str(out)])
  result = json.loads(out.read_text())
  parts = result['parts']
  assert list(parts) == list(compile_parts.PARTS)
  for part in parts.values():
    assert 0 < part['distinct_kernels'] <= part['kernels'] and part['xla_seconds'] > 0
  # The train step is the gradients plus the update; the gradients, the forward pass plus the backward.
  assert parts['forward']['kernels'] < parts['gradients']['kernels'] < parts['train_step']['kernels']
  # One parameter shape: the same update kernels, of which only a handful distinct.
  one_shape, update = parts['sgd_update_one_shape'], parts['sgd_update']
  assert one_shape['kernels'] == update['kernels'] and one_shape['distinct_kernels'] < update['distinct_kernels']
  assert result['parameters'] > result['distinct_parameter_shapes'] > 1


@pytest.mark.parametrize('op, shape', [('conv1x1', ['--channels', '6', '--out_channels', '4']),
                                       ('conv3x3', ['--channels', '6', '--out_channels', '4']),
                                       ('stem_pool', ['--channels', '3'])])
def test_kernel_ops_times_both_kernel_sets_of_one_operation(tmp_path, op, shape):
  out = tmp_path / 'op.json'
  kernel_ops.main(['--op', op, '--batch', '2', '--size', '7', *shape, '--rounds', '2', '--json', str(out)])
  result = json.loads(out.read_text())
  assert result['op'] == op and result['size'] == 7
  assert set(result['median_ms']) == {f'{side}_{part}' for side in ('xla', 'cpu')
                                      for part in ('forward', 'with_gradients')}
  assert all(ms > 0 for ms in result['median_ms'].values())
  assert result['cpu_speedup_forward'] == pytest.approx(
      result['median_ms']['xla_forward'] / result['median_ms']['cpu_forward'], rel=0.01)


def test_kernel_ops_refuses_kernel_sets_that_disagree():
  same = {'xla': (jnp.ones(3), [jnp.arange(3.0)]), 'cpu': (jnp.ones(3), [jnp.arange(3.0) * (1 + 1e-7)])}
  kernel_ops.check_same(same)
  with pytest.raises(SystemExit, match='disagree'):
    kernel_ops.check_same({**same, 'cpu': (jnp.ones(3), [jnp.arange(3.0) * 1.001])})


@pytest.mark.skipif(not host_memory.applies(), reason='freed memory is kept only under glibc, on the CPU')
def test_host_memory_benchmark_times_both_sides_and_leaves_memory_kept(tmp_path):
  out = tmp_path / 'host_memory.json'
  host_memory_benchmark.main([*TINY, '--json', str(out)])
  result = json.loads(out.read_text())
  assert result['host_memory'] == 'freed memory kept'
  for kind in ('train', 'eval'):
    for side in ('kept', 'returned'):
      assert set(result[kind][side]) == {'wall', 'cpu', 'kernel', 'faults'} and result[kind][side]['wall'] > 0
    assert result[kind]['speedup_kept'] == pytest.approx(
        result[kind]['returned']['wall'] / result[kind]['kept']['wall'], rel=0.01)


def test_scanned_blocks_compile_less_code(monkeypatch):
  # Four layers per block, one scan per block.
  monkeypatch.setitem(model_lib.MODELS, 'tiny', functools.partial(model_lib.cifar_densenet, 28, 4, bottleneck=True,
                                                               compression=0.5))
  args = [*TINY_MODEL, '--memory_efficient', '--parts', 'gradients']
  unrolled = compile_parts.run(compile_parts.parse_args([*args, '--layers_per_scan', '0']))['parts']['gradients']
  scanned = compile_parts.run(compile_parts.parse_args([*args, '--layers_per_scan', '4']))['parts']['gradients']
  # 752 vs 1,172 equations and 399 vs 563 kernels (measured). Distinct kernels fall only in deeper models:
  # this one's layers are few and small (docs/performance.md has DenseNet-BC L=190).
  assert scanned['jaxpr_equations'] < 0.8 * unrolled['jaxpr_equations']
  assert scanned['kernels'] < 0.8 * unrolled['kernels']


def test_bench_measures_scanned_blocks_against_unrolled_ones():
  result = bench.run(bench.parse_args([*TINY, '--memory_efficient', '--layers_per_scan', '2',
                                       '--reference', 'unrolled', '--skip_eval']))
  assert result['layers_per_scan'] == 2 and 'layers_per_scan' not in result['reference']['implementation']
  assert result['images_per_second'] > 0 and result['reference']['images_per_second'] > 0
  with pytest.raises(SystemExit):
    bench.parse_args([*TINY, '--no-memory_efficient', '--layers_per_scan', '2'])


@pytest.mark.parametrize('reference, checkpointed', [('torch', False), ('torch_memory_efficient', True)])
def test_the_pytorch_reference_checkpoints_only_when_asked_by_name(monkeypatch, reference, checkpointed):
  # PyTorch at its best by default, even against the memory-efficient JAX model.
  built = []

  class RecordingRunner:
    def __init__(self, name, model, batch, size, compile_model, **sweep):
      built.append(model)
      raise SystemExit('recorded')

  monkeypatch.setattr(bench, 'TorchRunner', RecordingRunner)
  with pytest.raises(SystemExit, match='recorded'):
    bench.run(bench.parse_args([*TINY, '--memory_efficient', '--reference', reference]))
  assert built[0].memory_efficient is checkpointed


def test_bench_compares_kernel_sets(tmp_path):
  out = tmp_path / 'result.json'
  bench.main([*TINY, '--kernels', 'cpu', '--reference', 'kernels', '--reference_kernels', 'xla', '--skip_eval',
              '--json', str(out)])
  result = json.loads(out.read_text())
  assert 'kernels=xla' in result['reference']['implementation']
  assert result['contention']['contended'] or result['speedup_vs_reference'] > 0


def test_the_gpu_script_checks_every_kernel_set_and_form_for_equality():
  import gpu_check  # noqa: PLC0415  (benchmarks/, on sys.path above)

  deviations = gpu_check.equality(kernel_sets=('xla',))
  assert set(deviations) == {'xla/unrolled', 'xla/memory_efficient', 'xla/scanned'}
  for form, parts in deviations.items():
    assert max(parts.values()) < 1e-3, (form, parts)
  assert bench.parse_args(['--model', 'densenet121', '--batch', '256', '--dtype', 'bfloat16', '--kernels', 'xla',
                           '--reference', 'torch', '--torch_compile'])


def test_the_gpu_script_predicts_only_for_a_gpu_it_has_a_target_for(tmp_path, monkeypatch):
  import gpu_check  # noqa: PLC0415

  assert 'no target config describes' in gpu_check.finish_deviceless(
      gpu_check.start_deviceless('densenet121', 'unrolled', str(tmp_path)))['error']  # this CPU
  started = []
  monkeypatch.setattr(gpu_check.subprocess, 'Popen', lambda command, **kwargs: started.append(command))
  monkeypatch.setattr(gpu_check.jax, 'devices', lambda: [types.SimpleNamespace(device_kind='NVIDIA L4')])
  gpu_check.start_deviceless('densenet121', 'memory_efficient', str(tmp_path))
  assert '--gpu=l4' in started[0] and '--config.memory_efficient=True' in started[0]


def _stat(user, system, idle, steal=0):
  return f'cpu  {user} 0 {system} {idle} 0 0 0 {steal} 0 0\ncpu0 {user} 0 {system} {idle} 0 0 0 {steal} 0 0\n'


def test_other_processes_load_is_the_machines_busy_time_less_this_processes():
  assert machine_load.parse_proc_stat(_stat(300, 100, 500, steal=100), 100) == (5.0, 1.0, 10.0)
  with pytest.raises(ValueError, match='"cpu" line'):
    machine_load.parse_proc_stat('intr 1 2 3\n', 100)
  before = machine_load.Sample(wall=0.0, busy=10.0, steal=0.0, total=100.0, own=3.0, loadavg=(0.0, 0.0, 0.0))
  # 20 s of machine time: 12 s busy, of which this process 9 s and the hypervisor's other tenants 1 s.
  after = machine_load.Sample(wall=10.0, busy=22.0, steal=1.0, total=120.0, own=12.0, loadavg=(1.0, 0.5, 0.2))
  assert machine_load.others(before, after) == dict(other_cpu_fraction=0.15, steal_fraction=0.05, seconds=10.0)
  assert machine_load.others(None, after) is None
  assert machine_load.utilization(cpu_seconds=3.0, wall_seconds=2.0, threads=2) == 0.75
  assert machine_load.probe(0.05) is None or 0 <= machine_load.probe(0.05)['other_cpu_fraction'] <= 1


def test_the_contention_rule_names_every_reason_to_withhold_a_ratio():
  idle, busy = dict(other_cpu_fraction=0.02, steal_fraction=0.0), dict(other_cpu_fraction=0.4, steal_fraction=0.1)
  assert machine_load.judge(idle, idle, {'jax_train': 0.9, 'reference_train': 0.97}) == []
  reasons = machine_load.judge(busy, idle, {'jax_train': 0.3, 'reference_train': 0.97})
  assert len(reasons) == 2 and 'before the run' in reasons[0] and reasons[1].startswith('jax_train')
  assert machine_load.judge(idle, busy, {}, max_other_load=0.5) == []
  assert 'could not be measured' in machine_load.judge(None, idle, {})[0]


def test_a_contended_run_prints_no_ratio_and_fails_when_strict():
  result = dict(model='m', batch=2, dtype='float32', images_per_second=10.0, eval_images_per_second=40.0,
                reference=dict(images_per_second=8.0, eval_images_per_second=50.0),
                speedup_vs_reference=1.25, eval_speedup_vs_reference=0.8,
                contention=dict(contended=False, reasons=[]))
  assert bench.summary_line(result).endswith('ratio train 1.25x, eval 0.8x')
  assert bench.exit_status(result, strict=True) == 0
  contended = {**result, 'contention': dict(contended=True, reasons=['other processes used 40%'])}
  del contended['speedup_vs_reference'], contended['eval_speedup_vs_reference']
  line = bench.summary_line(contended)
  assert 'ratio' not in line and 'NO RATIO: other processes used 40%' in line
  assert bench.exit_status(contended, strict=False) == 0
  assert bench.exit_status(contended, strict=True) == bench.CONTENDED_EXIT_STATUS != 0
