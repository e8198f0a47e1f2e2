"""The benchmark scripts run, measure what they say, and check what they compare."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from densenet_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import bench  # noqa: E402
import block_forms  # noqa: E402
import compile_parts  # noqa: E402
from benchmarks import common  # noqa: E402

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
  subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench.py'), '--model', 'densenet_l40_k12',
                  '--batch', '2', '--image_size', '8', '--steps', '1', '--rounds', '2', '--reference', 'torch',
                  '--json', str(out)], check=True, cwd=ROOT, capture_output=True, timeout=600)
  result = json.loads(out.read_text())
  for key in ('model', 'batch', 'image_size', 'dtype', 'memory_efficient', 'device', 'images_per_second',
              'compile_seconds', 'temp_bytes', 'eval_images_per_second', 'xla_flags'):
    assert key in result, key
  assert result['model'] == 'densenet_l40_k12' and result['image_size'] == 8 and result['temp_bytes'] > 0
  reference = result['reference']
  assert reference['implementation'].startswith('PyTorch') and reference['images_per_second'] > 0
  assert result['speedup_vs_reference'] == pytest.approx(
      result['images_per_second'] / reference['images_per_second'], rel=0.02)


def test_bench_measures_memory_efficient_against_the_plain_model():
  result = bench.run(bench.parse_args([*TINY, '--memory_efficient', '--reference', 'plain', '--skip_eval']))
  assert result['memory_efficient'] and 'memory_efficient=False' in result['reference']['implementation']
  # Rematerialization keeps less for the backward pass (conftest sets the XLA flag train.py sets).
  assert result['temp_bytes'] < result['reference']['temp_bytes']


def test_bench_refuses_a_plain_reference_without_memory_efficient():
  with pytest.raises(SystemExit):
    bench.parse_args([*TINY, '--reference', 'plain'])


def test_bench_measures_other_xla_options_against_the_defaults():
  options = json.dumps(common.YNNPACK_CONVOLUTIONS)
  result = bench.run(bench.parse_args([*TINY, '--reference', 'xla_options', '--xla_options', options, '--skip_eval']))
  assert result['reference']['implementation'].endswith(f'XLA options {options}')
  assert result['reference']['images_per_second'] > 0 and result['speedup_vs_reference'] > 0


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


def test_scanned_blocks_compile_less_code(monkeypatch):
  # Four layers per block, one scan per block.
  monkeypatch.setitem(model_lib.MODELS, 'tiny', functools.partial(model_lib.cifar_densenet, 28, 4, bottleneck=True,
                                                               compression=0.5))
  args = [*TINY_MODEL, '--memory_efficient', '--parts', 'gradients']
  unrolled = compile_parts.run(compile_parts.parse_args(args))['parts']['gradients']
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
    bench.parse_args([*TINY, '--layers_per_scan', '2'])  # without --memory_efficient


@pytest.mark.parametrize('reference, checkpointed', [('torch', False), ('torch_memory_efficient', True)])
def test_the_pytorch_reference_checkpoints_only_when_asked_by_name(monkeypatch, reference, checkpointed):
  # PyTorch at its best by default, even against the memory-efficient JAX model.
  built = []

  class RecordingRunner:
    def __init__(self, name, model, batch, size, compile_model):
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
  assert result['speedup_vs_reference'] > 0


def test_the_gpu_script_checks_every_kernel_set_and_form_for_equality():
  import gpu_check  # noqa: PLC0415  (benchmarks/, on sys.path above)

  deviations = gpu_check.equality(kernel_sets=('xla',))
  assert set(deviations) == {'xla/unrolled', 'xla/memory_efficient', 'xla/scanned'}
  for form, parts in deviations.items():
    assert max(parts.values()) < 1e-3, (form, parts)
  assert bench.parse_args(['--model', 'densenet121', '--batch', '256', '--dtype', 'bfloat16', '--kernels', 'xla',
                           '--reference', 'torch', '--torch_compile'])
