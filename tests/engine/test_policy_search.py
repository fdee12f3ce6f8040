"""The policy search: chosen policies fit their caps (on paper and in the engine), more memory never
predicts less throughput, impossible caps say what is short, the program names things by meaning.

A fixed synthetic Hardware keeps these tests deterministic and free of probing.
"""
import json

import pytest
import torch

from engine import LLM, MemoryBudgetError, Policy
from engine import compression, cost_model
from engine import policy_search as ps
from engine.config import opt_config, read_hf_config
from engine.placement import Precision
from engine.hardware import Hardware
from engine.policy_search import PolicySearchError, predict, search_policy

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture(scope="module")
def hw():
    return Hardware(
        host="test", cpu_count=2, torch_threads=2, compute_device="cpu", compute_dtype="float32",
        matmul_flops=140e9, matmul_rows=2048,
        matmul_small_m=((1, 6e9), (2, 10e9), (4, 18e9), (8, 30e9), (16, 50e9), (32, 70e9), (64, 90e9),
                        (128, 110e9), (256, 120e9), (512, 130e9)),
        int8_matmul=((1, 20e9), (32, 150e9), (512, 300e9)),
        attn_prefill_flops=60e9, attn_decode_elems_per_s=1e9, memcpy_bytes_per_s=12e9,
        convert_elems_per_s=1.2e9, narrow_elems_per_s=1.0e9, h2d_bytes_per_s=0.0, d2h_bytes_per_s=0.0,
        dequant_elems_per_s=0.15e9, cache_dequant_elems_per_s=0.5e9, quant_elems_per_s=0.1e9,
        io_memcpy_bytes_per_s=8e9, io_cache_dequant_elems_per_s=0.5e9,
        io_convert_elems_per_s=1.0e9, io_narrow_elems_per_s=0.8e9, io_dequant_elems_per_s=0.1e9,
        io_quant_elems_per_s=0.07e9, io_threads=1, disk_read_bytes_per_s=0.7e9,
        disk_write_bytes_per_s=1.2e9, disk_read_latency_s=150e-6, disk_write_latency_s=250e-6,
        disk_direct=True, op_overhead_s=4e-6, attn_layer_overhead_s=3e-4, mlp_layer_overhead_s=1e-4, gpu_mem=20 * GiB, cpu_mem=20 * GiB, disk_mem=100 * GiB,
        ram_available=20 * GiB)


@pytest.fixture(scope="module")
def small_opt(tmp_path_factory):
    """A small OPT shape (config.json only; run with dummy=True): big enough that caps force offloading."""
    path = tmp_path_factory.mktemp("opt-small")
    (path / "config.json").write_text(json.dumps({
        "model_type": "opt", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 128, "word_embed_proj_dim": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}))
    return path


def _fits(choice, caps):
    for tier, cap in caps.items():
        assert choice.predicted_peaks[tier] <= cap, (tier, choice.predicted_peaks[tier], cap)
        assert choice.predicted_preflight[tier] <= cap, (tier, choice.predicted_preflight[tier], cap)


@pytest.mark.parametrize("caps", [
    {"gpu_mem": 400 * MiB, "cpu_mem": 200 * MiB, "disk_mem": 10 * GiB},
    {"gpu_mem": 900 * MiB, "cpu_mem": 4 * GiB, "disk_mem": 0},
    {"gpu_mem": 350 * MiB, "cpu_mem": 100 * MiB, "disk_mem": 10 * GiB},
])
def test_chosen_policy_fits_the_caps(hw, caps):
    choice = search_policy(opt_config("opt-125m"), hw, 128, 16, max_block_size=32, **caps)

    _fits(choice, {t: caps[f"{t}_mem"] for t in ("gpu", "cpu", "disk")})
    assert choice.predicted_tokens_per_s > 0
    assert choice.predicted_prefill_s > 0 and choice.predicted_decode_s > 0
    # the searched figures are those of predict() on the same policy: one cost model
    again = predict(opt_config("opt-125m"), hw, choice.policy, 128, 16, **caps)
    assert again.tokens_per_s == pytest.approx(choice.predicted_tokens_per_s)
    assert again.fits


def test_offloading_caps_force_lower_tiers(hw):
    cfg = opt_config("opt-350m")
    free = search_policy(cfg, hw, 64, 8, disk_mem=10 * GiB)
    tight = search_policy(cfg, hw, 64, 8, gpu_mem=500 * MiB, cpu_mem=200 * MiB, disk_mem=10 * GiB)

    assert free.policy.w_gpu_percent == 100
    assert tight.policy.w_gpu_percent < 100 and tight.predicted_peaks["disk"] > 0
    assert tight.predicted_tokens_per_s < free.predicted_tokens_per_s


def test_engine_runs_the_chosen_policy_within_its_caps(hw, small_opt, tmp_path):
    cfg = read_hf_config(small_opt)
    caps = {"gpu_mem": 400_000, "cpu_mem": 60_000, "disk_mem": 50 * MiB}
    prompt_len, gen_len = 12, 4
    choice = search_policy(cfg, hw, prompt_len, gen_len, max_block_size=8, **caps)
    policy = choice.policy
    assert policy.w_gpu_percent < 100                       # the caps really force offloading

    llm = LLM.from_pretrained(small_opt, policy=policy, dummy=True, offload_dir=tmp_path / "off", progress=False,
                              **caps)
    try:
        prompts = torch.randint(3, 90, (policy.block_size, prompt_len), generator=torch.Generator().manual_seed(0))
        out = llm.generate(prompts.tolist(), max_new_tokens=gen_len, ignore_eos=True)
        peaks = llm.last_stats["peak_bytes"]
    finally:
        llm.close()

    assert all(len(o) == gen_len for o in out)
    for tier in ("gpu", "cpu", "disk"):
        assert peaks[tier] <= caps[f"{tier}_mem"]
        assert peaks[tier] <= choice.predicted_peaks[tier]       # the model bounds the engine's trackers
    assert (peaks["cpu"], peaks["disk"]) == (choice.predicted_peaks["cpu"], choice.predicted_peaks["disk"])


PLACEMENTS = [
    dict(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=40, cache_gpu_percent=25,
         cache_cpu_percent=50),
    dict(gpu_batch_size=3, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0,
         act_gpu_percent=0, act_cpu_percent=0),
    dict(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=60, cache_gpu_percent=50, act_gpu_percent=0,
         act_cpu_percent=100, compress_weight=True, compress_cache=True),
    dict(gpu_batch_size=4, w_gpu_percent=50, w_cpu_percent=50, cache_gpu_percent=0, cache_cpu_percent=100,
         sep_layer=False),
    # prefill's 320 rows dequantize whole 4-bit copies, decode's 32 multiply packed and borrow scratch
    dict(gpu_batch_size=32, w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100,
         compress_weight=True),
    # int8 decoder weights on all three tiers (copied into pool buffers off the gpu tier)
    dict(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=50,
         int8_matmul=True),
    # 4-bit weights on three tiers made int8 rows in whole working copies, also for decode's 32 rows
    dict(gpu_batch_size=32, w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=50, int8_matmul=True,
         compress_weight=True, compress_cache=True),
]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_predicted_peaks_match_the_engines_trackers(hw, small_opt, tmp_path, placement, overlap):
    cfg = read_hf_config(small_opt)
    policy = Policy(overlap=overlap, **placement)
    llm = LLM.from_pretrained(small_opt, policy=policy, dummy=True, offload_dir=tmp_path / "off", progress=False)
    try:
        prompts = torch.randint(3, 90, (policy.block_size, 10), generator=torch.Generator().manual_seed(1))
        llm.generate(prompts.tolist(), max_new_tokens=5, ignore_eos=True)
        measured = llm.last_stats["peak_bytes"]
    finally:
        llm.close()

    predicted = predict(cfg, hw, policy, 10, 5).peaks
    assert measured["cpu"] == predicted["cpu"] and measured["disk"] == predicted["disk"]
    if overlap:   # how many pool buffers two neighbouring layers hold at once depends on the I/O thread's timing
        assert measured["gpu"] <= predicted["gpu"]
    else:         # without the I/O thread the next layer is always loaded before this one computes
        assert measured["gpu"] == predicted["gpu"]


def test_decode_trims_prefills_working_copies_and_borrows_scratch_only(hw, small_opt, monkeypatch):
    """Prefill (32 x 10 rows) dequantizes whole 4-bit working copies; decode's 32 rows a step are
    multiplied packed, so at the switch the pool drops those copies and borrows only the scratch
    compression.linear uses (a small CHUNK_ELEMS makes scratch smaller than a copy at this size)."""
    monkeypatch.setattr(compression, "CHUNK_ELEMS", 256)
    placement = dict(gpu_batch_size=32, cache_gpu_percent=0, cache_cpu_percent=100, compress_weight=True)
    out = {}
    for w_gpu in (0, 100):
        policy = Policy(w_gpu_percent=w_gpu, **dict(placement, w_cpu_percent=100 - w_gpu), overlap=False)
        llm = LLM.from_pretrained(small_opt, policy=policy, dummy=True, progress=False)
        try:
            prompts = torch.randint(3, 90, (32, 10), generator=torch.Generator().manual_seed(2))
            out[w_gpu] = llm.generate(prompts.tolist(), max_new_tokens=4, ignore_eos=True)
            idle = llm.pool.idle_bytes
            whole = max(layer.weights.working_bytes() for layer in llm.layers)
        finally:
            llm.close()
        pool = predict(read_hf_config(small_opt), hw, policy, 10, 4).pool_bytes
        assert idle == pool["decode"] < pool["prefill"]     # what decode holds, measured and predicted
        assert idle < whole                                 # less than one layer's working copies
    assert out[0] == out[100]


@pytest.mark.parametrize("tier", ["gpu", "cpu"])
def test_more_memory_never_predicts_less_throughput(hw, tier):
    cfg = opt_config("opt-350m")
    fixed = {"gpu_mem": 300 * MiB, "cpu_mem": 300 * MiB, "disk_mem": 20 * GiB}
    rates = []
    for cap in (300, 500, 1000, 2400):
        caps = dict(fixed, **{f"{tier}_mem": cap * MiB})
        rates.append(search_policy(cfg, hw, 64, 8, max_block_size=16, **caps).predicted_tokens_per_s)

    assert all(b >= a * (1 - 1e-6) for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] > rates[0]


def test_impossible_caps_name_the_short_tier(hw):
    with pytest.raises(PolicySearchError) as err:
        search_policy(opt_config("opt-125m"), hw, 128, 8, gpu_mem=2 * MiB, cpu_mem=4 * GiB, disk_mem=10 * GiB)

    assert isinstance(err.value, MemoryBudgetError)
    assert set(err.value.shortfall) == {"gpu"} and err.value.shortfall["gpu"] > 0
    msg = str(err.value)
    assert "gpu tier is short by" in msg and "--gpu-mem" in msg


def test_impossible_caps_without_disk_name_every_short_tier(hw):
    # opt-125m needs about 250 MB in fp16 somewhere; 20 MB of CPU and no disk cannot hold it
    with pytest.raises(PolicySearchError) as err:
        search_policy(opt_config("opt-125m"), hw, 64, 8, gpu_mem=100 * MiB, cpu_mem=20 * MiB, disk_mem=0)

    short = err.value.shortfall
    assert short and set(short) <= {"gpu", "cpu", "disk"}
    # whichever tiers the cheapest fix names, together they must cover the missing weight bytes
    assert sum(short.values()) > 50 * MiB
    assert "short by" in str(err.value)


def test_program_names_variables_and_constraints_by_meaning(hw):
    st = cost_model.make_setup(opt_config("opt-125m"), hw, prompt_len=64, gen_len=8, gpu_batch_size=4,
                               num_gpu_batches=2, precision=Precision(hw.compute_device, torch.float16),
                               overlap=True, sep_layer=True, caps={"gpu": GiB, "cpu": GiB, "disk": 10 * GiB})
    prob, _, _ = ps.placement_lp(st)
    variables = {v.name for v in prob.variables()}
    constraints = {c.name for c in prob.constraints()}

    for name in ("weight_frac_gpu", "weight_frac_cpu", "weight_frac_disk", "cache_frac_gpu", "cache_frac_disk",
                 "act_on_gpu", "act_on_disk", "decode_time_attn_to_mlp", "prefill_time_head_to_embed"):
        assert name in variables, name
    for name in ("gpu_peak_prefill", "gpu_peak_decode", "cpu_peak_decode", "disk_peak_prefill",
                 "gpu_engine_preflight", "ram_in_use_prefill", "decode_attn_to_mlp_weights_io_thread",
                 "decode_attn_to_mlp_cache_io_thread", "decode_attn_to_mlp_first_cache_load", "prefill_mlp_to_attn_cpu_cores",
                 "weight_cpu_share_nonnegative", "act_on_one_tier"):
        assert name in constraints, name


def test_search_reports_binding_constraints_and_placement(hw):
    choice = search_policy(opt_config("opt-125m"), hw, 128, 8, gpu_mem=400 * MiB, cpu_mem=100 * MiB,
                           disk_mem=10 * GiB, max_block_size=16)

    assert any("time" in c or "thread" in c or "cores" in c for c in choice.binding_constraints)
    assert choice.predicted_peaks["gpu"] >= 0.8 * 400 * MiB           # the tight tier is nearly full
    assert sum(choice.placement["weight_frac"].values()) == pytest.approx(1.0)
    assert sum(choice.placement["cache_frac"].values()) == pytest.approx(1.0)
    assert choice.to_dict()["policy"]["gpu_batch_size"] == choice.policy.gpu_batch_size


def test_auto_policy_uses_the_tiers_caps(hw, small_opt, tmp_path, monkeypatch):
    monkeypatch.setattr(ps, "load_hardware", lambda: hw)
    search = ps.auto_choice
    monkeypatch.setattr(ps, "auto_choice", lambda *args: search(*args[:5], max_block_size=8))   # a faster search
    caps = {"gpu_mem": 400_000, "cpu_mem": 60_000, "disk_mem": 50 * MiB}

    llm = LLM.from_pretrained(small_opt, policy="auto", dummy=True, offload_dir=tmp_path / "off", progress=False,
                              **caps)
    try:
        out = llm.generate([[5, 6, 7, 8]] * 3, max_new_tokens=3, ignore_eos=True)
        peaks = llm.last_stats["peak_bytes"]
    finally:
        llm.close()

    assert llm.policy.w_gpu_percent < 100
    assert all(len(o) == 3 for o in out)
    assert all(peaks[t] <= caps[f"{t}_mem"] for t in ("gpu", "cpu", "disk"))


def test_auto_policy_without_offload_dir_keeps_off_disk(hw, monkeypatch):
    from engine.tiers import Tiers
    monkeypatch.setattr(ps, "load_hardware", lambda: hw)

    policy = ps.auto_policy(opt_config("opt-125m"), Tiers(None, gpu_mem=400 * MiB, cpu_mem=2 * GiB), prompt_len=64,
                            gen_len=8, max_block_size=16)

    assert policy.percents("w")[2] == 0 and policy.percents("cache")[2] == 0 and policy.act_tier != "disk"


def test_bad_workloads_are_rejected(hw):
    with pytest.raises(ValueError, match="context window"):
        search_policy(opt_config("opt-125m"), hw, 2040, 32)
    with pytest.raises(ValueError, match="at least 1"):
        search_policy(opt_config("opt-125m"), hw, 64, 0)


@pytest.mark.parametrize("options", [dict(sep_layer=False), dict(compress_weight=True, compress_cache=True),
                                     dict(overlap=False), dict(storage_bytes=4)])
def test_search_options_are_honoured_and_the_engine_runs_them(hw, small_opt, tmp_path, options):
    cfg = read_hf_config(small_opt)
    caps = {"gpu_mem": 500_000, "cpu_mem": 100_000, "disk_mem": 50 * MiB}
    choice = search_policy(cfg, hw, 10, 3, max_block_size=4, **caps, **options)
    policy = choice.policy
    for key in ("sep_layer", "compress_weight", "compress_cache", "overlap"):
        if key in options:
            assert getattr(policy, key) == options[key]

    dtype = "float32" if options.get("storage_bytes") == 4 else "float16"
    llm = LLM.from_pretrained(small_opt, policy=policy, dummy=True, offload_dir=tmp_path / "off", progress=False,
                              dtype=dtype, **caps)
    try:
        prompts = torch.randint(3, 90, (policy.block_size, 10), generator=torch.Generator().manual_seed(2))
        llm.generate(prompts.tolist(), max_new_tokens=3, ignore_eos=True)
        peaks = llm.last_stats["peak_bytes"]
    finally:
        llm.close()
    for tier in ("gpu", "cpu", "disk"):
        assert peaks[tier] <= caps[f"{tier}_mem"]
        assert peaks[tier] <= choice.predicted_peaks[tier]


def test_int8_products_are_chosen_only_when_asked(hw):
    """int8 products change answers, so the search never picks them unasked; left to it (None), it
    picks them where the probe says they are faster (this fake machine: about 2x float32 at prefill)."""
    cfg = opt_config("opt-125m")
    plain = search_policy(cfg, hw, 128, 2, max_block_size=16)
    free = search_policy(cfg, hw, 128, 2, max_block_size=16, int8_matmul=None)
    assert not plain.policy.int8_matmul
    assert free.policy.int8_matmul and free.predicted_tokens_per_s > plain.predicted_tokens_per_s


def test_an_auto_dict_fixes_the_precision_and_a_string_leaves_it_to_the_search():
    from engine.generate import auto_precision
    assert auto_precision("auto") == {"compress_weight": None, "compress_cache": None, "int8_matmul": False}
    assert auto_precision({"auto": True, "int8_matmul": True}) == {
        "compress_weight": False, "compress_cache": False, "int8_matmul": True}
    assert auto_precision({"auto": True, "compress_weight": None}) == {        # None: left to the search
        "compress_weight": None, "compress_cache": False, "int8_matmul": False}
    with pytest.raises(ValueError, match="chooses the placement"):
        auto_precision({"auto": True, "gpu_batch_size": 4})
