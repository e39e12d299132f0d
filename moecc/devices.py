"""GPU device profiles: the one place that says what a GPU can do.

Limits (shared memory per block, registers) decide which kernel configurations may run;
rates (memory bandwidth, peak matmul throughput) feed predictions and roofline floors.
Figures are vendor datasheet values (dense, no sparsity; tensor-core rates with fp32
accumulation, which for GeForce cards is half their fp16-accumulate rate); a measured
roofline always uses rates measured in the same run, never these. Checked 2026-11 against
the H100/H200/A100/L40S datasheets and the Ada (RTX 4090), Ampere (RTX 3090) and
Blackwell (RTX 5090) whitepapers; shared memory per block is the opt-in maximum of the
CUDA programming guide (227 KiB sm_90, 163 KiB sm_80, 99 KiB sm_86/sm_89/sm_120).
Known simplification: the A100 40 GB (1555 GB/s) shares the "a100" key with the 80 GB
SXM figures.

Device keys are normalised: several spellings of one GPU ("NVIDIA H100 80GB HBM3",
"H100-SXM5-80GB", compute capability 9.0 with 132 SMs) map to one key ("h100_sxm").
Other cards of a family (H100 NVL, RTX 4090 D, laptop GPUs, 3090 Ti) do not borrow a
profile: they get their own stable slug key ("h100_nvl_sm90") and can be tuned, not
predicted. `current_profile` builds a limits-only profile for such a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceProfile:
    key: str  # normalised key, used in tuning-file names
    name: str  # human-readable
    arch: int  # compute capability as an int: 90 = sm_90
    num_sms: int
    max_shared_memory_per_block: int  # bytes, opt-in maximum (what Triton may use)
    registers_per_sm: int
    l2_bytes: int
    memory_bandwidth_gbps: float  # datasheet, GB/s
    peak_tflops: dict = field(default_factory=dict)  # dtype -> dense TFLOP/s (tensor cores)
    has_fp8: bool = False
    aliases: tuple[str, ...] = ()  # regexes over the lower-cased marketing name

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_tflops[dtype]
        except KeyError:
            raise KeyError(f"{self.name} has no {dtype} tensor-core rate; known: {sorted(self.peak_tflops)}")


_KB = 1024
PROFILES: tuple[DeviceProfile, ...] = (
    DeviceProfile("h100_sxm", "NVIDIA H100 SXM", 90, 132, 227 * _KB, 65536, 50 * _KB * _KB, 3350.0,
                  {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "int8": 1979.0, "tf32": 494.0}, True,
                  (r"h100.*(sxm|hbm3)", r"h100$", r"h100 80gb hbm3")),
    DeviceProfile("h100_pcie", "NVIDIA H100 PCIe", 90, 114, 227 * _KB, 65536, 50 * _KB * _KB, 2000.0,
                  {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "int8": 1513.0, "tf32": 378.0}, True,
                  (r"h100.*pcie",)),
    DeviceProfile("h200", "NVIDIA H200", 90, 132, 227 * _KB, 65536, 50 * _KB * _KB, 4800.0,
                  {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "int8": 1979.0, "tf32": 494.0}, True,
                  (r"h200",)),
    DeviceProfile("a100", "NVIDIA A100", 80, 108, 163 * _KB, 65536, 40 * _KB * _KB, 2039.0,
                  {"bf16": 312.0, "fp16": 312.0, "int8": 624.0, "tf32": 156.0}, False,
                  (r"a100",)),
    DeviceProfile("l40s", "NVIDIA L40S", 89, 142, 99 * _KB, 65536, 96 * _KB * _KB, 864.0,
                  {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "int8": 733.0, "tf32": 183.0}, True,
                  (r"l40s",)),
    DeviceProfile("rtx4090", "NVIDIA GeForce RTX 4090", 89, 128, 99 * _KB, 65536, 72 * _KB * _KB, 1008.0,
                  {"bf16": 165.0, "fp16": 165.0, "fp8": 330.0, "int8": 660.0, "tf32": 82.6}, True,
                  (r"rtx ?4090(?! ?d\b)(?!.*(laptop|mobile))", r"geforce 4090")),
    DeviceProfile("rtx3090", "NVIDIA GeForce RTX 3090", 86, 82, 99 * _KB, 65536, 6 * _KB * _KB, 936.0,
                  {"bf16": 71.0, "fp16": 71.0, "int8": 284.0, "tf32": 35.6}, False,
                  (r"rtx ?3090(?! ?ti)(?!.*(laptop|mobile))", r"geforce 3090")),
    DeviceProfile("rtx5090", "NVIDIA GeForce RTX 5090", 120, 170, 99 * _KB, 65536, 96 * _KB * _KB, 1792.0,
                  {"bf16": 209.5, "fp16": 209.5, "fp8": 419.0, "int8": 838.0, "tf32": 104.8}, True,
                  (r"rtx ?5090(?!.*(laptop|mobile))", r"geforce 5090")),
)
_BY_KEY = {p.key: p for p in PROFILES}


_VARIANT_WORDS = frozenset({"pcie", "sxm", "nvl", "laptop", "mobile", "ti", "d", "super", "max"})


class UnknownDeviceError(KeyError):
    pass


def profile(key: str) -> DeviceProfile:
    """The profile for a device key or any spelling of its name."""
    normalised = normalise_device_key(key)
    if normalised in _BY_KEY:
        return _BY_KEY[normalised]
    raise UnknownDeviceError(
        f"no device profile for {key!r}; known devices: {', '.join(sorted(_BY_KEY))}"
    )


def normalise_device_key(name: str, arch: int | None = None, num_sms: int | None = None) -> str:
    """Map a marketing name (and optionally arch / SM count) to a profile key.

    The SM count disambiguates variants that share a name prefix (H100 SXM 132 SMs vs
    PCIe 114). An unknown GPU gets a stable slug of its name and arch, so tuning files for
    it still have one key.
    """
    lowered = name.strip().lower().replace("_", " ").replace("-", " ")
    if lowered.replace(" ", "_") in _BY_KEY:
        return lowered.replace(" ", "_")
    if arch is not None and num_sms is not None:
        # the SM count decides between variants of one family ("NVIDIA H100" with 114 SMs
        # is the PCIe card): the family is the key's first part, "h100" of "h100_pcie"
        # A variant word in the name that the profile does not carry ("NVL", "Laptop",
        # "Ti", "D") means another card of the family, not this profile.
        squashed = lowered.replace(" ", "")
        words = set(lowered.split()) & _VARIANT_WORDS
        for p in PROFILES:
            own = set(p.name.lower().split()) | set(p.key.split("_"))
            if (p.arch == arch and p.num_sms == num_sms and p.key.split("_")[0] in squashed
                    and words <= own):
                return p.key
    for p in PROFILES:
        if any(re.search(a, lowered) for a in p.aliases):
            return p.key
    slug = re.sub(r"[^a-z0-9]+", "_", lowered.replace("nvidia", "").replace("geforce", "")).strip("_")
    return f"{slug}_sm{arch}" if arch is not None else slug


def current_device_key(device_index: int = 0) -> str:
    """Normalised key of a visible CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return normalise_device_key(props.name, props.major * 10 + props.minor, props.multi_processor_count)


def profiles_for_arch(arch: int) -> list[DeviceProfile]:
    return [p for p in PROFILES if p.arch == arch]


def current_profile(device_index: int = 0) -> DeviceProfile:
    """The profile of a visible CUDA device; an unknown GPU gets one built from its
    reported limits (no rates: predictions need a known profile, tuning does not)."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    key = normalise_device_key(props.name, props.major * 10 + props.minor, props.multi_processor_count)
    if key in _BY_KEY:
        return _BY_KEY[key]
    return DeviceProfile(
        key, props.name, props.major * 10 + props.minor, props.multi_processor_count,
        int(getattr(props, "shared_memory_per_block_optin", 48 * _KB)),
        int(getattr(props, "regs_per_multiprocessor", 65536)), int(getattr(props, "L2_cache_size", 0)),
        0.0, {}, props.major * 10 + props.minor >= 89,
    )
