"""Weights on disk (archlab.interop.io): atomic folders, safetensors only, precise key errors.

Checked: a failed write leaves the previous folder whole; pickle-only folders are refused, never
loaded; missing/unexpected/misshapen tensors are listed in the CheckpointError; sharded HF folders read.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from archlab.errors import CheckpointError
from archlab.interop.io import atomic_dir, check_state_dict, read_hf_folder, write_hf_folder


def test_atomic_dir_keeps_old_folder_when_write_fails(tmp_path):
    target = tmp_path / "ckpt"
    write_hf_folder(target, {"v": 1}, {"w": torch.ones(2)})
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{half")
            raise RuntimeError("killed mid-write")
    config, state = read_hf_folder(target)
    assert config == {"v": 1} and torch.equal(state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_atomic_dir_replaces_on_success(tmp_path):
    target = tmp_path / "ckpt"
    write_hf_folder(target, {"v": 1}, {"w": torch.ones(2)})
    write_hf_folder(target, {"v": 2}, {"w": torch.zeros(3)})
    config, state = read_hf_folder(target)
    assert config == {"v": 2} and state["w"].shape == (3,)


def test_atomic_dir_takes_subfolders(tmp_path):
    target = tmp_path / "lab"
    with atomic_dir(target) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "attention").mkdir()
        (tmp / "attention" / "map.png").write_bytes(b"png")
    assert (target / "attention" / "map.png").read_bytes() == b"png" and (target / "result.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["lab"]


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_hf_folder(tmp_path)


def test_missing_folder_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        read_hf_folder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_hf_folder(tmp_path)


def test_sharded_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "s2.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, state = read_hf_folder(tmp_path)
    assert set(state) == {"a", "b"}


def test_check_state_dict_lists_every_problem():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(4)}
    got = {"a": torch.zeros(2), "c": torch.zeros(5), "z": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        check_state_dict(expected, got, "x.safetensors")
    msg = str(e.value)
    assert "missing keys: b" in msg and "unexpected keys: z" in msg and "c: checkpoint (5,) vs model (4,)" in msg
    check_state_dict(expected, dict(expected), "ok")  # no error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rope_model_loads_back_with_the_same_logits(tmp_path, dtype):
    """load_model gives the model the dtype its weights are stored in; that ``.to`` once rounded RoPE's float64
    frequencies to it, so a float32 Llama loaded back differed from the one saved in the last bit, a bf16 one by
    far more. Saved and loaded: the same logits to the bit."""
    from archlab.interop.io import load_model, save_model
    from archlab.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, max_len=512, d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, d_ff=64,
                              rope_theta=100000.0)).to(dtype).eval()  # fmt: skip
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    ids = torch.randint(0, 64, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.pos.inv_freq.dtype == torch.float64


def test_loading_a_model_draws_no_random_weights(tmp_path):
    """load_model builds the model without its random initial draws (WithoutRandomInit): the global random state is
    left as it was, and every weight is the saved one (llama-tiny: Linear, Embedding, RMSNorm weights, tied head)."""
    from archlab.interop.io import load_model, save_model
    from archlab.models.registry import build_model

    saved = build_model("llama-tiny").eval()
    save_model(saved, tmp_path / "m")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loaded = load_model(tmp_path / "m")
    assert torch.equal(torch.get_rng_state(), before)
    state = loaded.state_dict()
    assert set(state) == set(saved.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in saved.state_dict().items())
    ids = torch.randint(0, saved.config.vocab_size, (1, 8))
    assert torch.equal(saved(ids), loaded(ids))


def test_without_random_init_leaves_draws_out_in_its_thread_only():
    import threading

    from archlab.models.registry import WithoutRandomInit, build_model

    t = torch.full((4, 4), 7.0)
    before = torch.get_rng_state()
    with WithoutRandomInit():
        for draw in (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
                     torch.nn.init.xavier_uniform_, torch.nn.init.uniform_):
            assert torch.equal(draw(torch.ones(4, 4)), torch.zeros(4, 4))
        assert torch.equal(torch.nn.init.normal_(tensor=torch.ones(3)), torch.zeros(3))  # the keyword form
        weight = torch.nn.Parameter(torch.ones(3))
        torch.nn.init.normal_(weight)  # a parameter, outside no_grad: as the draw, allowed
        assert torch.equal(torch.nn.init.trunc_normal_(torch.ones(4, 4)), torch.zeros(4, 4))  # its redraw loop ends
        t[1:].uniform_()
        t[1:].normal_()
        assert torch.equal(torch.get_rng_state(), before)  # nothing drawn
        drawn = {}
        other = threading.Thread(target=lambda: drawn.update(t=torch.nn.init.normal_(torch.zeros(64))))
        other.start()
        other.join()
        torch.nn.init.constant_(t[0], 2.0)  # not a draw: done
    assert torch.equal(t[1:], torch.zeros(3, 4)) and torch.equal(t[0], torch.full((4,), 2.0))
    assert torch.equal(weight.detach(), torch.zeros(3))
    assert drawn["t"].std() > 0.5  # another thread's initialisation draws as ever
    torch.manual_seed(0)
    a = build_model("llama-tiny")
    torch.manual_seed(0)
    b = build_model("llama-tiny")  # after the mode: initialised as ever, the same draws
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.lm_head.weight.std() > 0.01
