"""Weights on 2 MiB pages (moecc/huge_pages.py, passes/huge_pages.py)."""

from __future__ import annotations

import pytest
import torch

from moecc.huge_pages import HUGE_PAGE, collapse, huge_page_buffer, huge_page_bytes, unavailable_reason

needs_thp = pytest.mark.skipif(bool(unavailable_reason()), reason=unavailable_reason() or "n/a")


def _collapsed_or_skip(result):
    if result.failed_bytes:
        pytest.skip(f"this kernel could not collapse: {result.errors}")


def _fresh_mapping_tensor(numel: int) -> torch.Tensor:
    """fp32 values in a fresh anonymous mapping, not 2 MiB-aligned: small pages unless THP is
    'always' (torch's allocator may hand out heap memory an earlier test collapsed)."""
    import mmap

    mm = mmap.mmap(-1, 4 * numel + 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    x = torch.frombuffer(mm, dtype=torch.float32, offset=4096, count=numel)  # keeps `mm` alive
    x.copy_(torch.randn(numel))
    return x


@needs_thp
def test_collapse_keeps_values_and_address_and_moves_pages():
    x = _fresh_mapping_tensor(3 * HUGE_PAGE // 4 + 123)  # ~6 MiB: >= 2 whole huge pages inside
    before, ptr = x.clone(), x.data_ptr()
    if "[always]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        assert huge_page_bytes(x) < 2 * HUGE_PAGE
    result = collapse([x, x[10:], x.view(-1, 1)])  # three views of one storage: handled once
    _collapsed_or_skip(result)
    assert result.tensors == 1
    assert result.collapsed_bytes >= 2 * HUGE_PAGE
    assert huge_page_bytes(x) >= 2 * HUGE_PAGE
    assert x.data_ptr() == ptr
    assert torch.equal(x, before)


@needs_thp
def test_collapse_skips_small_and_non_cpu_tensors():
    result = collapse([torch.randn(1000), torch.empty(1 << 22, device="meta"), "not a tensor"])
    assert result.tensors == 0 and result.collapsed_bytes == 0 and not result.errors
    assert "0 weight tensors" in result.describe()


@needs_thp
def test_huge_page_buffer_is_aligned_and_writable():
    buf = huge_page_buffer(3 * HUGE_PAGE)
    assert buf.numel() == 3 * HUGE_PAGE and buf.data_ptr() % HUGE_PAGE == 0
    buf.view(torch.float32).fill_(2.0)
    assert float(buf.view(torch.float32).sum()) == 2.0 * 3 * HUGE_PAGE / 4
    assert huge_page_bytes(buf) >= HUGE_PAGE


def test_unavailable_reason_is_reported_not_raised(monkeypatch):
    import moecc.huge_pages as hp

    monkeypatch.setattr(hp, "unavailable_reason", lambda: "transparent huge pages are disabled")
    result = hp.collapse([torch.randn(1 << 22)])
    assert result.tensors == 0 and "disabled" in result.describe()


@needs_thp
@pytest.mark.parametrize("enabled", [True, False])
def test_pass_moves_graph_weights_and_changes_nothing(enabled):
    from moecc import CompileReport

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 16)).eval()
    x = torch.randn(3, 1024)
    expected = model(x)
    report = CompileReport()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecc",
                             options={"rest_of_graph": "eager", "huge_pages": enabled, "report": report})
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    result = next(p for p in report.graphs[0].passes if p.name == "huge_pages")
    if enabled:
        if result.counters["failed_mib"]:
            pytest.skip(f"this kernel could not collapse: {result.notes}")
        assert result.counters["tensors"] == 1  # the 8 MiB weight; the others are under 2 MiB
        assert result.counters["collapsed_mib"] >= 4
        assert huge_page_bytes(model[0].weight) >= 2 * HUGE_PAGE
    else:
        assert result.counters == {"tensors": 0, "collapsed_mib": 0, "failed_mib": 0}


def test_option_must_be_bool():
    from moecc.options import CompileOptions, OptionsError

    with pytest.raises(OptionsError, match="huge_pages"):
        CompileOptions(huge_pages="yes")
