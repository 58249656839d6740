"""The characterization report: written with its findings table and plots."""
from __future__ import annotations

from fxscale.studies.characterize import FAMILIES, Grid, characterize, slope


def test_report_has_findings_tables_and_plots(tmp_path):
    report = characterize(tmp_path, models=("llama",), repeats=2,
                          cpu_grid=Grid(batches=(1, 2), lengths=(16, 32)),
                          h100_grid=Grid(batches=(1, 64), lengths=(128, 1024)))
    text = report.read_text()
    for finding in ("prefill attention grows quadratically with length",
                    "decode attention is memory-bound",
                    "linear layers turn compute-bound only at large batch",
                    "norms and activations are memory-bound",
                    "compute and memory sensitivity are uncorrelated"):
        assert finding in text
    # the H100 model reproduces the closed forms: attention FLOPs ~ length^2 in prefill,
    # decode attention at ~1 FLOP/B is memory-bound everywhere on the grid
    assert "FLOPs ~ length^2.00" in text
    assert "4/4 grid points memory-bound" in text
    for kind in ("prefill-length", "decode-batch", "roofline"):
        for ext in ("png", "svg"):
            assert (tmp_path / f"llama-{kind}.{ext}").stat().st_size > 1000


def test_slope_of_exact_power_laws():
    grid = Grid(batches=(1, 2, 4), lengths=(8, 16, 32))
    table = {("prefill", b, n): {"attention": {"flops": 3.0 * b * n * n}}
             for b in grid.batches for n in grid.lengths}
    assert abs(slope(table, "attention", "flops", "prefill", "length", grid) - 2.0) < 1e-9
    assert abs(slope(table, "attention", "flops", "prefill", "batch", grid) - 1.0) < 1e-9
    assert slope(table, "gemm", "flops", "prefill", "batch", grid) is None


def test_families_cover_decoder_moe_and_encoder_decoder():
    assert {"llama", "mixtral", "whisper"} <= set(FAMILIES)
