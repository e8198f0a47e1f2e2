"""The CPU family is read from /proc/cpuinfo, and each family gets the defaults measured on it."""

import pytest

from densenet_jax.platform import cpu_family, xla_flags
from densenet_jax import platform

# First processors of /proc/cpuinfo, abridged to the fields detection reads and a few it must ignore.
AMD_EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse avx avx2 avx512f
"""
AMD_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16
"""
INTEL_XEON_AVX512 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni amx_tile
"""
INTEL_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu sse sse2 avx avx2 fma
"""
INTEL_AVX_ONLY = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx
"""
ARM_NEOVERSE = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


@pytest.mark.parametrize('text, family', [
    (AMD_EPYC_AVX2, cpu_family.AMD_AVX2), (AMD_ZEN4, cpu_family.AMD_AVX512),
    (INTEL_XEON_AVX512, cpu_family.INTEL_AVX512), (INTEL_AVX2, cpu_family.INTEL_AVX2),
    (INTEL_AVX_ONLY, cpu_family.OTHER), (ARM_NEOVERSE, cpu_family.ARM), ('', cpu_family.OTHER),
    ('processor\t: 0\nvendor_id\t: HygonGenuine\nflags\t\t: avx2\n', cpu_family.OTHER),
])
def test_the_family_comes_from_the_first_processors_vendor_and_flags(text, family):
  assert cpu_family.from_cpuinfo(text) == family


def test_an_unreadable_cpuinfo_is_another_family(tmp_path):
  assert cpu_family.host(str(tmp_path / 'missing')) == cpu_family.OTHER
  (tmp_path / 'cpuinfo').write_text(INTEL_XEON_AVX512)
  assert cpu_family.host(str(tmp_path / 'cpuinfo')) == cpu_family.INTEL_AVX512
  assert cpu_family.host() in cpu_family.FAMILIES


def test_each_family_gets_what_was_measured_on_it_and_xla_defaults_otherwise():
  assert {family: platform.default_form('cpu', family).kernels for family in cpu_family.FAMILIES} == {
      cpu_family.AMD_AVX2: 'cpu', cpu_family.INTEL_AVX512: 'xla', cpu_family.AMD_AVX512: 'cpu',
      cpu_family.INTEL_AVX2: 'xla', cpu_family.ARM: 'xla', cpu_family.OTHER: 'xla'}
  for family in cpu_family.FAMILIES:  # A CPU measurement never sets another backend's default.
    assert platform.default_form('gpu', family) == platform.default_form('tpu', family) == platform.Form(
        kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax')
  assert set(cpu_family.MEASURED) == {cpu_family.AMD_AVX2, cpu_family.AMD_AVX512, cpu_family.INTEL_AVX512}
  assert all(defaults.evidence for defaults in cpu_family.MEASURED.values())
  with pytest.raises(ValueError, match='Unknown CPU family'):
    cpu_family.defaults('sparc')


def test_the_eigen_convolution_flag_only_where_it_won_and_on_the_jaxlib_it_was_measured_on():
  measured = next(iter(xla_flags.CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB))
  for family in cpu_family.FAMILIES:
    flags = xla_flags.default_flags(measured, family)
    assert (xla_flags.CPU_CONVOLUTIONS_ON_EIGEN in flags) == (family == cpu_family.AMD_AVX2), family
    assert xla_flags.default_flags('0.0.1', family) == (xla_flags.KEEP_REMAT_ON_CPU,)
