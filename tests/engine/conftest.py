"""Fixtures: tiny random OPT, Llama and Qwen2 checkpoints written with transformers' save_pretrained."""
import pytest
from enginekit import _save_llama, _save_opt, _save_qwen2


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt-tiny")
    return path, _save_opt(path)


@pytest.fixture(scope="session")
def tiny_opt_350m_like(tmp_path_factory):
    """word_embed_proj_dim != hidden (project_in / project_out) and post-LN, like OPT-350m."""
    path = tmp_path_factory.mktemp("opt-350m-like")
    return path, _save_opt(path, word_embed_proj_dim=16, do_layer_norm_before=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tiny")
    return path, _save_llama(path, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tiny-tied")
    return path, _save_llama(path, tie_word_embeddings=True, num_key_value_heads=1)




@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-tiny")
    return path, _save_qwen2(path, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-tiny-tied")
    return path, _save_qwen2(path, tie_word_embeddings=True, num_key_value_heads=1)
