"""Packed shared-prefix training equals separate sequences; resumed runs equal uninterrupted ones."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from cec.engine.scorer import head_for
from cec.errors import CECError, ConfigError
from cec.training.examples import NoteExamples
from cec.engine.lora import inject_lora, lora_parameters, lora_state_dict
from cec.training.checkpoint import TrainingError, latest_checkpoints
from cec.training.packing import pack_loss, pack_questions
from cec.training.trainer import TrainConfig, Trainer, lr_factor
from hf_tiny import hf_model, ours_from_hf
from tiny_train import random_lora_, tiny_tokenizer

YES, NO = [5, 6], [7, 8]


@functools.lru_cache(maxsize=None)
def base_model(family):
    return ours_from_hf(hf_model(family))


def lora_model(family="gemma3", dropout=0.0, seed=0):
    model = copy.deepcopy(base_model(family))
    torch.manual_seed(seed)
    cfg = inject_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)
    return model, cfg


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "llama"])
@pytest.mark.parametrize("max_tokens", [4096, 24])
def test_packed_loss_and_grads_equal_separate_sequences(family, max_tokens):
    model, _ = lora_model(family)
    random_lora_(model, seed=1)  # non-zero B, so every LoRA matrix gets a gradient
    head = head_for(model, YES, NO)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(9, 300, (14,), generator=g).tolist()
    common = [11, 12, 13]  # a shared question start that joins the prefix
    questions = [common + torch.randint(9, 300, (n,), generator=g).tolist() for n in (4, 6, 1, 5)]
    labels = [1, 0, 0, 1]

    packs, cut = pack_questions(prefix, questions, labels, max_tokens)
    assert cut == 0 and (len(packs) == 1) == (max_tokens == 4096)
    assert all(p.tokens <= max_tokens for p in packs)
    model.zero_grad()
    packed = sum(pack_loss(model, head, p)[0] for p in packs)
    packed.backward()
    g_packed = grads(model)

    model.zero_grad()
    separate = 0.0
    for q, y in zip(questions, labels):
        ids = torch.tensor([prefix + q])
        score = head.scores(model(ids, final_norm=False)[0, -1:])
        separate = separate + F.binary_cross_entropy_with_logits(score, torch.tensor([float(y)]), reduction="sum")
    separate.backward()
    g_separate = grads(model)

    assert abs(packed.item() - separate.item()) < 1e-5
    assert set(g_packed) == set(g_separate) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in g_packed:
        assert (g_packed[n] - g_separate[n]).abs().max().item() < 1e-5, n


def test_long_prefix_is_cut_at_its_end():
    packs, cut = pack_questions(list(range(100, 150)), [[1, 2, 3], [1, 2, 4, 5]], [1, 0], max_tokens=20)
    assert cut == 50 - (20 - 2 - 2)  # room for the shared [1, 2] and the longest rest [4, 5]
    assert all(p.tokens <= 20 for p in packs)
    assert packs[0].ids[:16].tolist() == list(range(100, 116))
    with pytest.raises(ConfigError, match="does not fit in --max-tokens 20"):
        pack_questions([1], [list(range(30))], [1], max_tokens=20)


def test_lr_schedule():
    assert lr_factor(0, 4, 10, "linear") == 0.2 and lr_factor(3, 4, 10, "linear") == 0.8
    assert lr_factor(4, 4, 10, "linear") == 1.0 and lr_factor(9, 4, 10, "linear") == pytest.approx(1 / 6)
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5) and lr_factor(9, 0, 10, "constant") == 1.0


# -- the training loop on a tiny model, with short synthetic prompts ---------------------------------------
TOK = tiny_tokenizer()
NOTES = [{"id": f"n{i}", "text": f"patient {i} has {'fever' if i % 2 else 'cough'} and pain", "labels": []}
         for i in range(5)]


def make_examples(note, epoch):
    fever = "fever" in note["text"]
    qs = [(" fever?", fever), (" cough?", not fever), (f" pain {epoch}?", True), (" renal?", False)]
    return NoteExamples(note["id"], note["text"], [q for q, _ in qs], [int(y) for _, y in qs])


def trainer(tmp_path, dropout=0.1, **over):
    model, lcfg = lora_model("gemma3", dropout=dropout)
    cfg = TrainConfig(**{"steps": 4, "lr": 1e-2, "warmup": 1, "grad_accum": 2, "save_every": 2, "eval_every": 2,
                         "max_tokens": 40, "progress": False, **over})
    return Trainer(model, TOK, YES, NO, NOTES, make_examples, tmp_path, cfg, lcfg, dev_notes=NOTES[:2],
                   log=lambda m: None)


def test_resumed_run_ends_with_the_same_adapter(tmp_path, monkeypatch):
    full = trainer(tmp_path / "full")
    full.train()
    expected = {k: v.clone() for k, v in lora_state_dict(full.model).items()}
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "lora_B" in k)  # it did learn

    broken = trainer(tmp_path / "run")
    real_step = broken.train_step

    def crash_in_step_3():
        if broken.step == 2:
            real_step()  # step 3 runs, then the process dies before its checkpoint
            raise RuntimeError("killed")
        return real_step()

    monkeypatch.setattr(broken, "train_step", crash_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        broken.train()
    assert [p.name for p in latest_checkpoints(tmp_path / "run")] == ["step-000002"]

    resumed = trainer(tmp_path / "run")
    resumed.train(resume=True)
    got = lora_state_dict(resumed.model)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    log = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert {"dev_loss", "dev_auc", "dev_accuracy"} <= set(log[-1])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert [p.name for p in latest_checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]


def test_stop_at_then_resume_equals_one_run(tmp_path):
    full = trainer(tmp_path / "full", dropout=0.0, save_every=0, eval_every=0)
    full.train()
    part = trainer(tmp_path / "run", dropout=0.0, save_every=0, eval_every=0, stop_at=1)
    part.train()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    rest = trainer(tmp_path / "run", dropout=0.0, save_every=0, eval_every=0)
    rest.train(resume=True)
    for k, v in lora_state_dict(full.model).items():
        assert torch.equal(lora_state_dict(rest.model)[k], v)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    a = trainer(tmp_path / "a", dropout=0.1, steps=1, save_every=0, eval_every=0)
    b = trainer(tmp_path / "b", dropout=0.1, steps=1, save_every=0, eval_every=0, gradient_checkpointing=True)
    torch.manual_seed(5)
    ea = a.train_step()
    torch.manual_seed(5)
    eb = b.train_step()
    assert abs(ea["loss"] - eb["loss"]) < 1e-6
    for (k, va), vb in zip(lora_state_dict(a.model).items(), lora_state_dict(b.model).values()):
        assert (va - vb).abs().max().item() < 1e-6, k


def test_nan_loss_stops_with_the_last_checkpoint(tmp_path):
    t = trainer(tmp_path, dropout=0.0, steps=3, save_every=1, eval_every=0)
    real_step = t.train_step

    def poison():
        if t.step == 1:
            with torch.no_grad():
                lora_parameters(t.model)[0].fill_(float("nan"))
        return real_step()

    t.train_step = poison
    with pytest.raises(TrainingError, match="last good checkpoint: .*step-000001") as e:
        t.train()
    assert isinstance(e.value, CECError) and "\n" not in str(e.value)


def test_checkpoint_with_other_lora_tensors_is_refused_whole(tmp_path):
    from safetensors.torch import load_file, save_file

    trainer(tmp_path, dropout=0.0, steps=1, save_every=1, eval_every=0).train()
    ckpt = latest_checkpoints(tmp_path)[-1]
    weights = ckpt / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))

    fresh = trainer(tmp_path, dropout=0.0, steps=2, save_every=1, eval_every=0)
    before = {k: v.clone() for k, v in lora_state_dict(fresh.model).items()}
    with pytest.raises(TrainingError, match=r"step-000001: adapter lacks 1 LoRA tensors") as e:
        fresh.train(resume=True)
    assert "\n" not in str(e.value)
    for k, v in lora_state_dict(fresh.model).items():  # nothing half-restored
        assert torch.equal(v, before[k]), k


def test_a_checkpoint_folder_a_crash_left_half_written_is_ignored_then_removed(tmp_path):
    trainer(tmp_path, dropout=0.0, steps=2, save_every=1, eval_every=0, stop_at=1).train()
    stale = tmp_path / "checkpoints" / ".tmp-step-000002-4242"  # a process killed while saving step 2
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"half")
    assert [p.name for p in latest_checkpoints(tmp_path)] == ["step-000001"]
    trainer(tmp_path, dropout=0.0, steps=2, save_every=1, eval_every=0).train(resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
