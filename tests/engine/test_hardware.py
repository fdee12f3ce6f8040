"""The hardware probe: the cached JSON is reused and keyed by machine, caps override, rates interpolate."""
import dataclasses
import json

import pytest

from engine import hardware
from engine.hardware import Hardware, load_hardware

GiB = 1 << 30


def fake_hardware(**changes) -> Hardware:
    hw = Hardware(
        host="box", cpu_count=2, torch_threads=2, compute_device="cpu", compute_dtype="float32",
        matmul_flops=140e9, matmul_rows=2048, matmul_small_m=((1, 5e9), (8, 30e9), (64, 90e9), (512, 120e9)),
        int8_matmul=((1, 20e9), (32, 150e9), (512, 300e9)),
        attn_prefill_flops=60e9, attn_decode_elems_per_s=1e9, memcpy_bytes_per_s=12e9, convert_elems_per_s=1e9,
        narrow_elems_per_s=1e9, h2d_bytes_per_s=0.0, d2h_bytes_per_s=0.0, dequant_elems_per_s=1e8,
        quant_elems_per_s=1e8, cache_dequant_elems_per_s=5e8, io_cache_dequant_elems_per_s=5e8,
        io_memcpy_bytes_per_s=8e9, io_convert_elems_per_s=1e9, io_narrow_elems_per_s=1e9,
        io_dequant_elems_per_s=1e8, io_quant_elems_per_s=1e8, io_threads=1, disk_read_bytes_per_s=7e8,
        disk_write_bytes_per_s=1.2e9,
        disk_read_latency_s=1e-4, disk_write_latency_s=2e-4, disk_direct=True, op_overhead_s=4e-6, attn_layer_overhead_s=3e-4, mlp_layer_overhead_s=1e-4,
        gpu_mem=8 * GiB, cpu_mem=8 * GiB, disk_mem=50 * GiB, ram_available=8 * GiB)
    return dataclasses.replace(hw, **changes)


@pytest.fixture
def probes(monkeypatch):
    """Replace the real probe by a fake that counts its calls."""
    calls = []

    def probe(quick=False, disk_dir=None):
        calls.append(quick)
        return fake_hardware(quick=quick)
    monkeypatch.setattr(hardware, "probe", probe)
    return calls


def test_round_trip_through_json():
    hw = fake_hardware()
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


def test_probe_result_is_cached_and_reused(tmp_path, probes):
    path = tmp_path / "hw.json"

    first = load_hardware(path)
    second = load_hardware(path)

    assert probes == [False]                                   # measured once
    assert first.matmul_flops == second.matmul_flops == 140e9
    assert hardware.cache_key() in json.loads(path.read_text())


def test_refresh_measures_again_and_quick_does_not_stand_in_for_full(tmp_path, probes):
    path = tmp_path / "hw.json"

    load_hardware(path, quick=True)
    load_hardware(path, quick=True)                            # reused
    load_hardware(path)                                        # a full probe was asked for
    load_hardware(path, refresh=True)

    assert probes == [True, False, False]


def test_entries_of_other_machines_are_kept_and_ignored(tmp_path, probes):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"other-host-64cpu-cuda": fake_hardware(host="other").to_dict()}))

    load_hardware(path)

    entries = json.loads(path.read_text())
    assert probes == [False]
    assert set(entries) == {"other-host-64cpu-cuda", hardware.cache_key()}


def test_damaged_cache_is_measured_again(tmp_path, probes):
    path = tmp_path / "hw.json"
    path.write_text("{not json")

    load_hardware(path)

    assert probes == [False]
    assert hardware.cache_key() in json.loads(path.read_text())


def test_caps_override_capacities_but_not_ram(tmp_path, probes):
    hw = load_hardware(tmp_path / "hw.json", gpu_mem="1GB", cpu_mem="512MB", disk_mem=10 * GiB)

    assert (hw.gpu_mem, hw.cpu_mem, hw.disk_mem) == (GiB, 512 << 20, 10 * GiB)
    assert hw.ram_available > 0 and hw.ram_available != 512 << 20


def test_matmul_rate_interpolates_and_reaches_the_large_rate():
    hw = fake_hardware()
    rates = [hw.matmul_rate(m) for m in (1, 2, 8, 20, 64, 512, 1024, 2048, 10_000)]

    assert rates == sorted(rates)                              # more rows never run slower
    assert rates[0] == 5e9 and rates[2] == pytest.approx(30e9)
    assert 30e9 < hw.matmul_rate(20) < 90e9
    assert hw.matmul_rate(10_000) == 140e9


def test_cli_prints_json_with_caps(tmp_path, probes, capsys):
    assert hardware.main(["--out", str(tmp_path / "hw.json"), "--gpu-mem", "2GB", "--json"]) == 0

    out = json.loads(capsys.readouterr().out)
    assert out["gpu_mem"] == 2 * GiB and out["host"] == "box"


def test_cli_summary_is_readable(tmp_path, probes, capsys):
    hardware.main(["--out", str(tmp_path / "hw.json")])

    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "disk" in out and "capacity" in out


@pytest.mark.slow
def test_quick_probe_measures_positive_rates(tmp_path):
    hw = hardware.probe(quick=True, disk_dir=tmp_path)

    for f in dataclasses.fields(Hardware):
        value = getattr(hw, f.name)
        rate = f.name.endswith(("_per_s", "_flops", "_latency_s", "_s"))
        if rate and f.name not in ("h2d_bytes_per_s", "d2h_bytes_per_s"):
            assert value > 0, f.name
    assert [m for m, _ in hw.matmul_small_m] == list(hardware.SMALL_M)
    assert [m for m, _ in hw.int8_matmul] == list(hardware.INT8_M) and all(r > 0 for _, r in hw.int8_matmul)
    assert not list(tmp_path.glob("probe-*"))                  # the probe's disk files are gone
