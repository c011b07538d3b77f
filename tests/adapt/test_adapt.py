"""Adaptation: the initialization algorithm (Leroux et al., shared/PAPERS.md §1), distillation, kill-and-resume."""

from contextlib import contextmanager

import pytest
import torch

from cimattn.adapt import adapt_model, calibration_batch, load_adapted
from cimattn.adapt import distill as distill_module
from cimattn.adapt.distill import distill, kl_loss, sample_windows
from cimattn.adapt.initialize import (
    alpha,
    fit_scalers,
    initialize,
    measure,
    teacher_targets,
)
from cimattn.config import load_preset
from cimattn.models import convert, load_model
from cimattn.models.convert import (
    hardware_state_dict,
    scaler_parameters,
    trainable_parameters,
)

SMALL = {"window_tokens": 64, "tokens_per_array": 16}


def hardware(**adapt):
    recipe = {"calib_tokens": 128, "calib_context": 32, "init_iterations": 30, "layerwise_steps": 2, "finetune_steps": 3} | adapt
    return load_preset("leroux-gaincell").model_copy(
        update={"gaincell": load_preset("leroux-gaincell").gaincell.model_copy(update=SMALL),
                "adapt": load_preset("leroux-gaincell").adapt.model_copy(update=recipe)}
    )


def pair(hw):
    teacher, _ = load_model("tiny-llama", seed=1)
    student, _ = load_model("tiny-llama", seed=1)
    return convert(student, hw), teacher


def ids(n=2000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@contextmanager
def no_progress(description, total=None):
    yield lambda n=1: None


def test_alpha_schedule_is_the_papers():
    """α = linspace(1.0, 0.1, 50)[iteration], then 0.1."""
    expected = torch.linspace(1.0, 0.1, 50)
    assert [alpha(i) for i in range(50)] == pytest.approx(expected.tolist(), abs=1e-6)
    assert alpha(50) == alpha(99) == pytest.approx(0.1)


def fitted():
    """A converted tiny model whose scalers were fitted to its teacher's targets: (student, batch, targets)."""
    student, teacher = pair(hardware())
    batch = calibration_batch(ids(), 128, 32)
    targets = teacher_targets(student, teacher, batch)
    fit_scalers(student, batch, targets)
    return student, batch, targets


def test_initialization_reaches_its_targets():
    student, batch, targets = fitted()
    history = initialize(student, batch, targets, iterations=60, tolerance=1e-4)
    assert history[-1] < 1e-4, history
    stats = measure(student, batch)
    for key, (mu, sd) in stats.items():
        assert torch.allclose(mu, targets[key][0], atol=2e-4) and torch.allclose(sd, targets[key][1], atol=2e-4), key


def test_paper_iteration_converges_from_a_perturbed_fit():
    """Step 2 of the paper: from near the targets, the all-at-once update reaches the tolerance."""
    student, batch, targets = fitted()
    with torch.no_grad():
        for p in trainable_parameters(student, "scalers").values():
            p.mul_(1.05)
    history = initialize(student, batch, targets, iterations=100, tolerance=1e-4)
    assert history[0] > 1e-3 and history[-1] < 1e-4, history


def test_one_update_is_the_papers_formula():
    """After one iteration with α = 1: a ← a·σ*/σ and b ← b + μ* − μ, entry by entry."""
    hw = hardware()
    student, _ = pair(hw)
    batch = calibration_batch(ids(), 64, 32)
    before = measure(student, batch)
    module = dict(__import__("cimattn.models.convert", fromlist=["x"]).attention_modules(student))[0]
    a0, b0 = (p.detach().clone() for p in scaler_parameters(module, "q"))
    mu, sd = before[(0, "q")]
    targets = before | {(0, "q"): (mu + 0.1, sd * 2)}  # only this scaler is off: its update lowers the error, so it is kept
    history = initialize(student, batch, targets, iterations=1, tolerance=1e-9)
    assert len(history) == 2 and history[1] < history[0], history
    a1, b1 = scaler_parameters(module, "q")
    assert torch.allclose(a1, a0 * (sd * 2) / sd) and torch.allclose(b1, b0 + 0.1)


def test_distillation_lowers_the_loss():
    hw = hardware(lr=3e-2)
    student, teacher = pair(hw)
    data = ids()
    before = kl_loss(student(sample_windows(data, 2, 32, 0, 999)).logits, teacher(sample_windows(data, 2, 32, 0, 999)).logits)
    losses = distill(student, teacher, data, hw.adapt.model_copy(update={"batch_size": 2}), stage="t",
                     parameters=trainable_parameters(student, "scalers"), steps=25, budget_s=None,
                     checkpoint_dir=_tmp(), seed=0, progress=no_progress)
    with torch.no_grad():
        after = kl_loss(student(sample_windows(data, 2, 32, 0, 999)).logits, teacher(sample_windows(data, 2, 32, 0, 999)).logits)
    assert len(losses) == 25 and after < before


def test_training_computes_gradients_only_for_what_it_trains():
    # the rest of the model neither pays for weight gradients nor keeps them, and its flags come back as they were
    from cimattn.adapt.layerwise import capture_teacher, train_layers

    hw = hardware(train="scalers")
    student, teacher = pair(hw)
    student.model.embed_tokens.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    trained = trainable_parameters(student, "scalers")
    distill(student, teacher, ids(), hw.adapt, stage="t", parameters=trained, steps=2, budget_s=None,
            checkpoint_dir=_tmp(), seed=0, progress=no_progress)
    batch = calibration_batch(ids(), 64, 32)
    train_layers(student, capture_teacher(teacher, batch), hw.adapt, steps_per_layer=2, progress=no_progress)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trained)
    assert all(p.grad is None for p in trained.values())  # the optimizers cleared their own


def test_layerwise_scalers_train_in_their_own_group_without_weight_decay():
    from cimattn.adapt import layerwise

    hw = hardware(layerwise_lr=1e-4, layerwise_scaler_lr=1e-2, weight_decay=0.1)
    student, _ = pair(hw)
    _, _, attention = layerwise.decoder_layers(student)[0]
    named = layerwise.layer_parameters(attention, "attention")
    groups = layerwise.adamw(named, hw.adapt).param_groups
    scalers = {id(p) for n, p in named.items() if n.startswith("cim.scalers.")}
    assert len(groups) == 2 and scalers and {id(p) for p in groups[1]["params"]} == scalers
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-4, 0.1) and (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-2, 0.0)
    assert [g["lr"] for g in layerwise.adamw(named, hardware(layerwise_lr=1e-4).adapt).param_groups] == [1e-4]  # null: one rate


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


class Killed(Exception):
    pass


def killing_progress(after_steps):
    """A progress that kills the run (like Ctrl-C) after `after_steps` fine-tuning steps."""
    count = {"n": 0}

    @contextmanager
    def progress(description, total=None):
        def advance(n=1):
            if description.startswith("fine-tune"):
                count["n"] += n
                if count["n"] > after_steps:
                    raise Killed

        yield advance

    return progress


def test_killed_adaptation_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_module, "CHECKPOINT_EVERY_S", 0.0)  # checkpoint every step
    hw = hardware(finetune_steps=6)
    data = ids()
    kwargs = dict(budget_s=None, context=32, seed=3, evaluate=lambda label: 0.0)

    student, teacher = pair(hw)
    adapt_model(student, teacher, data, hw, checkpoint_dir=tmp_path / "whole", progress=no_progress, **kwargs)
    whole = hardware_state_dict(student)

    for kill_after in (2, 7):  # in the linear stage's fine-tuning, then in the nonlinear one
        student, teacher = pair(hw)
        with pytest.raises(Killed):
            adapt_model(student, teacher, data, hw, checkpoint_dir=tmp_path / "killed", progress=killing_progress(kill_after), **kwargs)
    student, teacher = pair(hw)
    metrics = adapt_model(student, teacher, data, hw, checkpoint_dir=tmp_path / "killed", progress=no_progress, **kwargs)
    resumed = hardware_state_dict(student)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert len(metrics["history"]["finetune_loss"]) == 6

    fresh, _ = pair(hw)
    load_adapted(fresh, tmp_path / "killed")
    for key, value in hardware_state_dict(fresh).items():
        assert torch.equal(value, whole[key])


@pytest.mark.parametrize("which", ["scalers", "lora", "attention"])
def test_layerwise_distillation_lowers_each_layers_error(which):
    from cimattn.adapt.layerwise import capture_teacher, train_layers

    hw = hardware(lr=1e-2, train=which)
    student, teacher = pair(hw)
    batch = calibration_batch(ids(), 64, 32)
    fit_scalers(student, batch, teacher_targets(student, teacher, batch))
    captured = capture_teacher(teacher, batch)
    assert sorted(captured.targets) == [0, 1]
    errors = train_layers(student, captured, hw.adapt, steps_per_layer=15, progress=no_progress)
    assert len(errors) == 2 and all(last < first for first, last in errors), errors


def test_layerwise_trains_each_layer_on_the_adapted_model_s_own_inputs(monkeypatch):
    """Layer 1 sees the hidden state that the hardware layer 0 produces, not the teacher's."""
    from cimattn.adapt import layerwise
    from cimattn.models.convert import attention_modules

    hw = hardware()
    student, teacher = pair(hw)
    batch = calibration_batch(ids(), 64, 32)
    seen = {}
    monkeypatch.setattr(layerwise, "_train", lambda attention, args, kwargs, *rest: seen.setdefault(attention.layer_idx, kwargs) and [0.0])
    layerwise.train_layers(student, layerwise.capture_teacher(teacher, batch), hw.adapt, steps_per_layer=1, progress=no_progress)
    own, teachers = {}, {}
    for model, found in ((student, own), (teacher, teachers)):
        def record(_, args, kwargs, found=found):
            found[len(found)] = kwargs["hidden_states"]

        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for _, m in attention_modules(model)]
        with torch.no_grad():
            model(batch)
        for h in hooks:
            h.remove()
    assert torch.allclose(seen[1]["hidden_states"], own[1], atol=1e-5)
    assert not torch.allclose(seen[1]["hidden_states"], teachers[1], atol=1e-3)


def test_finished_adaptation_keeps_only_its_result(tmp_path):
    hw = hardware(finetune_steps=2)
    student, teacher = pair(hw)
    adapt_model(student, teacher, ids(), hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress, evaluate=lambda label: 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardware.safetensors", "preset.yaml", "state.json"]
    assert (tmp_path / "state.json").stat().st_mode & 0o044  # readable like any result file


def test_unset_calibration_context_follows_the_run(tmp_path, monkeypatch):
    """HardSigmoid attention sums more keys in longer windows: adapt at the evaluated context."""
    import cimattn.adapt as adapt

    seen = []
    real = adapt.calibration_batch
    monkeypatch.setattr(adapt, "calibration_batch", lambda ids, tokens, context: seen.append(context) or real(ids, tokens, context))
    hw = hardware(calib_context=None, finetune_steps=0, layerwise_steps=0, init_iterations=1)
    student, teacher = pair(hw)
    adapt_model(student, teacher, ids(), hw, budget_s=None, context=48, checkpoint_dir=tmp_path, progress=no_progress, evaluate=lambda label: 0.0)
    assert seen == [48, 48]  # the statistics stages' batch and the layer-wise stage's text


def test_initialization_cut_by_the_budget_keeps_its_best_scalers(monkeypatch):
    """Out of time, the algorithm leaves the scalers of the lowest error it measured, not its last update."""
    import sys

    init_module = sys.modules["cimattn.adapt.initialize"]  # the package re-exports a function of that name
    student, batch, targets = fitted()
    far = {k: (mu + 0.3, sd * 3) for k, (mu, sd) in targets.items()}  # α = 1 from far away overshoots
    clock = iter([0.0, 0.0, 10.0])  # the deadline (5 s) passes before the third measurement
    monkeypatch.setattr(init_module.time, "perf_counter", lambda: next(clock))
    history = initialize(student, batch, far, iterations=10, tolerance=1e-9, deadline=5.0)
    assert len(history) == 3
    stats = measure(student, batch)
    now = max(torch.maximum((mu - far[k][0]).abs(), (sd - far[k][1]).abs()).max().item() for k, (mu, sd) in stats.items())
    assert now == pytest.approx(min(history), rel=1e-5)


def test_skipped_stages_do_not_run(tmp_path, monkeypatch):
    """`adapt.skip`: no fine-tuning of the linear model and no initialization algorithm; the nonlinear model is still measured."""
    import cimattn.adapt as adapt

    stages, labels = [], []
    monkeypatch.setattr(adapt.distill, "distill", lambda *a, stage, **k: stages.append(stage) or [1.0])
    monkeypatch.setattr(adapt, "initialize", lambda *a, **k: stages.append("iteration") or [0.0])
    hw = hardware(finetune_steps=2, skip=["linear_finetune", "init"])
    student, teacher = pair(hw)
    metrics = adapt_model(student, teacher, ids(), hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                          evaluate=lambda label: labels.append(label) or 1.0)
    assert stages == ["iteration", "finetune"]  # the linear model's calibration iteration only, then the end-to-end stage
    assert labels == ["linear cell, adapted", "nonlinear cell, linear model's parameters", "layer-wise distillation"]
    assert "ppl_hardware_initialized" in metrics and "init_error" not in metrics["history"]
    assert student.model.layers[0].self_attn.cim.cell == "nonlinear"


def test_budget_is_planned_from_the_steps_after_the_first(tmp_path, monkeypatch):
    """A first step slowed by one-off set-up does not shrink the plan: 20 s at 10 s then 1 s per step is 11 steps, not 2."""
    clock = [0.0]
    real_kl = distill_module.kl_loss

    def slow_first_kl(*args):
        clock[0] += 10.0 if clock[0] == 0.0 else 1.0
        return real_kl(*args)

    monkeypatch.setattr(distill_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(distill_module, "kl_loss", slow_first_kl)
    hw = hardware()
    student, teacher = pair(hw)
    losses = distill(student, teacher, ids(), hw.adapt, stage="finetune", parameters=trainable_parameters(student, "scalers"),
                     steps=None, budget_s=20.0, checkpoint_dir=tmp_path, seed=0, progress=no_progress)
    assert len(losses) == 3 + 8  # planned after 3 steps (12 s): 8 s left at 1 s per step


def test_initialization_stopped_by_its_limit_keeps_its_best_scalers():
    """`iterations` caps the updates: the state after the last one is measured too, and the best measured is kept."""
    student, batch, targets = fitted()
    far = {k: (mu + 0.3, sd * 3) for k, (mu, sd) in targets.items()}  # α = 1 from far away overshoots
    history = initialize(student, batch, far, iterations=2, tolerance=1e-9)
    assert len(history) == 3  # before each of the 2 updates, and after the last
    stats = measure(student, batch)
    now = max(torch.maximum((mu - far[k][0]).abs(), (sd - far[k][1]).abs()).max().item() for k, (mu, sd) in stats.items())
    assert now == pytest.approx(min(history), rel=1e-5)


@pytest.mark.parametrize("recipe", [{}, {"lr_final_fraction": 0.1, "kl_tokens": 12}], ids=["constant-rate", "decay-kl-draws"])
def test_a_budgeted_adaptation_replays_step_for_step(tmp_path, recipe):
    """Its recorded `adapt_steps`, run with no clock, give the same parameters bit for bit (the same machine)."""
    # a small layer-wise share: on a loaded machine its steps run slower than the one it timed, and must leave the
    # end-to-end stage some of the budget
    hw = hardware(init_iterations=3, layerwise_budget_share=0.25, **recipe)
    kwargs = dict(context=32, seed=3, progress=no_progress, evaluate=lambda label: 0.0)
    student, teacher = pair(hw)
    timed = adapt_model(student, teacher, ids(), hw, budget_s=4.0, checkpoint_dir=tmp_path / "timed", **kwargs)
    steps = timed["adapt_steps"]
    assert steps.get("linear_finetune", 0) > 0 and steps.get("layerwise", 0) > 0 and steps.get("finetune", 0) > 0, steps
    assert len(timed["history"]["finetune_loss"]) == steps["finetune"]
    student_again, teacher = pair(hw)
    replayed = adapt_model(student_again, teacher, ids(), hw, budget_s=None, steps=steps, checkpoint_dir=tmp_path / "replay", **kwargs)
    assert replayed["adapt_steps"] == steps
    first, second = hardware_state_dict(student), hardware_state_dict(student_again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_replaying_takes_no_budget_and_known_stages_only(tmp_path):
    from cimattn.errors import CimattnError

    hw = hardware()
    student, teacher = pair(hw)
    kwargs = dict(context=32, checkpoint_dir=tmp_path, progress=no_progress, evaluate=lambda label: 0.0)
    with pytest.raises(CimattnError, match="no wall-clock budget"):
        adapt_model(student, teacher, ids(), hw, budget_s=10.0, steps={"finetune": 1}, **kwargs)
    with pytest.raises(CimattnError, match="unknown adaptation stages"):
        adapt_model(student, teacher, ids(), hw, budget_s=None, steps={"warmup": 1}, **kwargs)


def test_hidden_state_matching_adds_each_layers_relative_error_to_the_kl():
    from cimattn.adapt.distill import distill_loss, relative_error

    # per token ‖h − t‖² / ‖t‖²: token 0 exact, token 1 wholly missing (1), a massive token weighs like any other
    target = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 24000.0]]])
    assert relative_error(torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 12000.0]]]), target).item() == pytest.approx((0 + 1 + 0.25) / 3)

    student, teacher = pair(hardware())
    batch = sample_windows(ids(), 2, 32, 0, 0)
    with torch.no_grad():
        s, t = student(batch, output_hidden_states=True), teacher(batch, output_hidden_states=True)
        layers = [((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean().item() for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])]
        kl = kl_loss(s.logits, t.logits).item()
        assert distill_loss(student, teacher, batch).item() == pytest.approx(kl, rel=1e-6)
        assert distill_loss(student, teacher, batch, 0.5).item() == pytest.approx(kl + 0.5 * sum(layers) / len(layers), rel=1e-5)
    assert len(layers) == teacher.config.num_hidden_layers and min(layers) > 0
    # the hidden term reaches the scalers' gradients too, and training with it lowers the loss
    hw = hardware(lr=3e-2, hidden_weight=1.0)
    losses = distill(student, teacher, ids(), hw.adapt, stage="t", parameters=trainable_parameters(student, "scalers"), steps=25,
                     budget_s=None, checkpoint_dir=_tmp(), seed=0, progress=no_progress)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_teacher_text_is_sampled_once_from_the_seed_and_read_back(tmp_path, monkeypatch):
    from cimattn.adapt.distill import TEACHER_TEXT, teacher_text

    _, teacher = pair(hardware())
    corpus = ids()
    text = teacher_text(teacher, corpus, 200, 40, 0, tmp_path / "a", no_progress, prompt_tokens=8)
    assert text.shape == (200,) and text.dtype == torch.long  # 5 rows of 40 tokens
    rows = text.reshape(5, 40)
    starts = torch.linspace(0, corpus.numel() - 8, 5).long()
    assert all(torch.equal(rows[i, :8], corpus[s : s + 8]) for i, s in enumerate(starts.tolist()))  # prompted by the corpus
    assert not torch.equal(rows[0, 8:], corpus[8:40])  # then the teacher's own tokens
    assert torch.equal(teacher_text(teacher, corpus, 200, 40, 0, tmp_path / "b", no_progress, prompt_tokens=8), text)  # seeded
    assert not torch.equal(teacher_text(teacher, corpus, 200, 40, 1, tmp_path / "c", no_progress, prompt_tokens=8), text)
    assert (tmp_path / "a" / TEACHER_TEXT).is_file()
    monkeypatch.setattr(teacher, "generate", lambda *a, **k: pytest.fail("a resumed run samples again"))
    assert torch.equal(teacher_text(teacher, corpus, 200, 40, 0, tmp_path / "a", no_progress, prompt_tokens=8), text)


def test_adaptation_on_teacher_text_reads_only_what_the_teacher_wrote(tmp_path, monkeypatch):
    from cimattn.adapt import distill as d

    seen = []
    real = d.sample_windows
    monkeypatch.setattr(d, "sample_windows", lambda data, *a: seen.append(data) or real(data, *a))
    hw = hardware(data="teacher", teacher_tokens=256, finetune_steps=2)
    student, teacher = pair(hw)
    corpus = ids()
    adapt_model(student, teacher, corpus, hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                evaluate=lambda label: 0.0)
    sampled = d.teacher_text(teacher, corpus, 256, 32, 0, tmp_path, no_progress)  # kept in the adapted directory: read back
    assert sampled.numel() == 256 and seen and all(data is not corpus and torch.equal(data, sampled) for data in seen)
    assert (tmp_path / d.TEACHER_TEXT).is_file()


def test_layerwise_steps_read_seeded_draws_of_a_larger_batch(monkeypatch):
    from cimattn.adapt import layerwise

    hw = hardware(calib_tokens=256, layerwise_tokens=64)  # 8 rows of 32 tokens; each step reads 2 of them
    student, teacher = pair(hw)
    captured = layerwise.capture_teacher(teacher, calibration_batch(ids(), 256, 32))
    seen = []
    real = layerwise.normalised_mse
    monkeypatch.setattr(layerwise, "normalised_mse", lambda out, target: seen.append(target) or real(out, target))
    layerwise.train_layers(student, captured, hw.adapt, steps_per_layer=6, progress=no_progress)
    first = captured.targets[min(captured.targets)]
    drawn = [tuple(i for i in range(8) if any(torch.equal(first[i], row) for row in t)) for t in seen[:6]]
    assert all(t.shape[0] == 2 for t in seen) and all(len(rows) == 2 for rows in drawn)
    assert len(set(drawn)) > 1  # other rows each step: the layer sees the whole batch over its steps
    again = layerwise.step_rows(captured.hidden, hw.adapt, 0, min(captured.targets))
    assert [tuple(again(step).tolist()) for step in range(6)] == drawn  # a function of (seed, layer, step)
    seen.clear()
    layerwise.train_layers(student, captured, hardware(calib_tokens=256).adapt, steps_per_layer=1, progress=no_progress)
    assert all(t.shape[0] == 8 for t in seen)  # unset: every step reads the whole batch, as before


def test_layerwise_stage_reads_its_own_text_and_the_statistics_stages_the_batch(tmp_path, monkeypatch):
    from cimattn.adapt import layerwise
    from cimattn.adapt.initialize import fit_scalers

    captured, fitted = [], []
    real_capture, real_fit = layerwise.capture_teacher, fit_scalers
    monkeypatch.setattr(layerwise, "capture_teacher", lambda teacher, batch: captured.append(batch) or real_capture(teacher, batch))
    monkeypatch.setattr("cimattn.adapt.fit_scalers", lambda model, batch, targets: fitted.append(batch) or real_fit(model, batch, targets))
    hw = hardware(calib_tokens=64, layerwise_text_tokens=256, layerwise_tokens=64, layerwise_steps=1)
    student, teacher = pair(hw)
    corpus = ids()
    adapt_model(student, teacher, corpus, hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                evaluate=lambda label: 0.0)
    assert [b.shape for b in fitted] == [(2, 32)] and torch.equal(fitted[0].flatten(), corpus[:64])
    assert [b.shape for b in captured] == [(8, 32)] and torch.equal(captured[0].flatten(), corpus[:256])


def test_layerwise_stage_reads_windows_of_its_own_length(tmp_path, monkeypatch):
    from cimattn.adapt import layerwise
    from cimattn.errors import CimattnError

    captured, rows = [], []
    real_capture, real_rows = layerwise.capture_teacher, layerwise.step_rows
    monkeypatch.setattr(layerwise, "capture_teacher", lambda teacher, batch: captured.append(batch) or real_capture(teacher, batch))
    monkeypatch.setattr(layerwise, "step_rows", lambda hidden, *a: rows.append(hidden.shape[:2]) or real_rows(hidden, *a))
    hw = hardware(calib_tokens=64, layerwise_context=64, layerwise_text_tokens=256, layerwise_tokens=64, layerwise_steps=1)
    student, teacher = pair(hw)
    corpus = ids()
    adapt_model(student, teacher, corpus, hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                evaluate=lambda label: 0.0)
    assert [b.shape for b in captured] == [(4, 64)] and torch.equal(captured[0].flatten(), corpus[:256])
    assert set(rows) == {(4, 64)}  # each step draws one 64-token row of the four
    with pytest.raises(CimattnError, match="layerwise_context 8192 is longer than the model's 4096 positions"):
        adapt_model(student, teacher, corpus, hardware(layerwise_context=8192), budget_s=None, context=32,
                    checkpoint_dir=tmp_path / "long", progress=no_progress, evaluate=lambda label: 0.0)


def test_end_to_end_fine_tuning_reads_windows_of_its_own_length(tmp_path, monkeypatch):
    from cimattn.adapt import distill as d

    lengths = []
    real = d.sample_windows
    monkeypatch.setattr(d, "sample_windows", lambda data, batch, context, *a: lengths.append(context) or real(data, batch, context, *a))
    hw = hardware(finetune_context=48, finetune_steps=2, layerwise_steps=0)  # the statistics stages read rows of 32
    student, teacher = pair(hw)
    adapt_model(student, teacher, ids(), hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                evaluate=lambda label: 0.0, steps={"linear_finetune": 2, "finetune": 2})
    assert lengths == [32, 32, 48, 48]  # the linear model's two steps, then the end-to-end ones


def test_an_adaptation_window_beyond_the_models_positions_is_a_clear_error(tmp_path):
    from cimattn.errors import CimattnError

    hw = hardware(finetune_context=8192)
    student, teacher = pair(hw)  # tiny-llama: 4,096 positions
    with pytest.raises(CimattnError, match="finetune_context 8192 is longer than the model's 4096 positions"):
        adapt_model(student, teacher, ids(), hw, budget_s=None, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                    evaluate=lambda label: 0.0)


def test_the_recipe_splits_a_budget_between_the_training_stages(tmp_path, monkeypatch):
    from cimattn.adapt import distill as d
    from cimattn.adapt import layerwise

    budgets, planned = {}, []
    monkeypatch.setattr(d, "distill", lambda *a, stage, budget_s, **k: budgets.update({stage: budget_s}) or [])
    monkeypatch.setattr(layerwise, "time_one_step", lambda *a: 0.01)
    monkeypatch.setattr(layerwise, "train_layers", lambda *a, steps_per_layer, **k: planned.append(steps_per_layer) or [])
    hw = hardware(linear_budget_share=0.2, layerwise_budget_share=0.25)
    student, teacher = pair(hw)
    adapt_model(student, teacher, ids(), hw, budget_s=100.0, context=32, checkpoint_dir=tmp_path, progress=no_progress,
                evaluate=lambda label: 0.0)
    assert 0.2 * 90 < budgets["linear"] <= 0.2 * 100  # of what the calibration left
    # the stages above spent (almost) nothing: the layer-wise stage plans its share of what is left, per layer of 2
    assert 0.25 * 90 / 2 / 0.01 < planned[0] <= 0.25 * 100 / 2 / 0.01
    assert 90 < budgets["finetune"] <= 100  # and the end-to-end stage all that is left (here almost all of it)


def test_the_rate_holds_while_the_budget_is_planned_then_falls_linearly_to_its_final_fraction(monkeypatch):
    from cimattn.adapt.distill import PLAN_AFTER_STEPS, lr_factor

    recipe = hardware(lr_final_fraction=0.1).adapt
    assert PLAN_AFTER_STEPS == 3
    # 8 planned steps: steps 0-2 at the full rate, then 1 − 0.9·(step − 2)/5 down to 0.1 at the last (step 7)
    assert [lr_factor(s, 8, recipe) for s in range(8)] == pytest.approx([1, 1, 1, 0.82, 0.64, 0.46, 0.28, 0.1])
    assert [lr_factor(s, None, recipe) for s in range(3)] == [1.0] * 3  # a budget not planned yet
    assert lr_factor(2, 3, recipe) == 1.0 and lr_factor(5, 8, hardware().adapt) == 1.0  # nothing left to fall over; constant
    assert [lr_factor(s, 8, recipe.model_copy(update={"warmup_steps": 2})) for s in (0, 3)] == pytest.approx([0.5, 0.82])
    # and the optimizer takes it
    rates = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    student, teacher = pair(hardware())
    distill(student, teacher, ids(), recipe, stage="t", parameters=trainable_parameters(student, "scalers"), steps=8,
            budget_s=None, checkpoint_dir=_tmp(), seed=0, progress=no_progress)
    assert rates == pytest.approx([recipe.lr * f for f in (1, 1, 1, 0.82, 0.64, 0.46, 0.28, 0.1)])


def test_kl_tokens_scores_a_seeded_draw_of_positions_with_the_full_kl_there():
    from cimattn.adapt.distill import distill_loss, sample_positions

    positions = sample_positions(32, 12, seed=0, step=5)
    assert positions.tolist() == sorted(set(positions.tolist())) and len(positions) == 12 and 0 <= positions.min() <= positions.max() < 32
    assert torch.equal(positions, sample_positions(32, 12, seed=0, step=5)) and not torch.equal(positions, sample_positions(32, 12, 0, 6))
    assert sample_positions(32, None, 0, 5) is None and sample_positions(32, 32, 0, 5) is None  # all of them
    student, teacher = pair(hardware())
    batch = sample_windows(ids(), 2, 32, 0, 0)
    with torch.no_grad():
        full = kl_loss(student(batch).logits[:, positions], teacher(batch).logits[:, positions]).item()
        assert distill_loss(student, teacher, batch, positions=positions).item() == pytest.approx(full, rel=1e-5)


def test_kl_tokens_on_a_model_without_logits_to_keep_is_a_clear_error():
    from cimattn.errors import CimattnError

    class LogitsOnly(torch.nn.Module):  # a causal LM whose forward cannot skip logits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, output_hidden_states=False):
            return self.model(input_ids, output_hidden_states=output_hidden_states)

    hw = hardware(kl_tokens=8)
    student, teacher = pair(hw)
    with pytest.raises(CimattnError, match="kl_tokens needs a model whose forward takes logits_to_keep"):
        distill(LogitsOnly(student), teacher, ids(), hw.adapt, stage="t", parameters=trainable_parameters(student, "scalers"),
                steps=1, budget_s=None, checkpoint_dir=_tmp(), seed=0, progress=no_progress)


def test_bf16_mixed_precision_runs_the_digital_layers_in_bf16_and_the_arrays_in_fp32(monkeypatch):
    import cimattn.attention.gaincell as gca

    arrays, projections = [], []
    real = gca._attend_blocks
    monkeypatch.setattr(gca, "_attend_blocks", lambda cim, q, *a: arrays.append((q.dtype, torch.is_autocast_enabled("cpu"))) or real(cim, q, *a))
    hw = hardware(mixed_precision="bf16", lr=3e-2)
    student, teacher = pair(hw)
    for model in (student, teacher):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: projections.append(out.dtype))
    kwargs = dict(stage="t", budget_s=None, seed=0, progress=no_progress)
    losses = distill(student, teacher, ids(), hw.adapt, parameters=trainable_parameters(student, "scalers"), steps=12, checkpoint_dir=_tmp(), **kwargs)
    assert set(projections) == {torch.bfloat16} and set(arrays) == {(torch.float32, False)}
    assert sum(losses[-3:]) < sum(losses[:3])  # and it trains
    student_fp32, teacher = pair(hw)
    fp32 = distill(student_fp32, teacher, ids(), hw.adapt.model_copy(update={"mixed_precision": "no"}),
                   parameters=trainable_parameters(student_fp32, "scalers"), steps=1, checkpoint_dir=_tmp(), **kwargs)
    assert losses[0] != fp32[0] and losses[0] == pytest.approx(fp32[0], rel=0.05)  # the same loss, at bf16's precision
    with torch.no_grad():  # nothing of the autocast stays on the model: it evaluates in fp32
        assert student(ids()[None, :32]).logits.dtype == torch.float32
    # the layer-wise steps too, while the teacher's targets are captured in fp32
    from cimattn.adapt.layerwise import capture_teacher, train_layers

    captured = capture_teacher(teacher, calibration_batch(ids(), 64, 32))
    assert all(t.dtype == torch.float32 for t in captured.targets.values())
    arrays.clear()
    walked = []
    student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: walked.append((out.dtype, torch.is_grad_enabled())))
    errors = train_layers(student, captured, hw.adapt.model_copy(update={"lr": 1e-2}), steps_per_layer=10, progress=no_progress)
    # training steps (with gradients) in bf16; the walk that makes the next layer's input (no gradients) in fp32
    assert set(walked) == {(torch.bfloat16, True), (torch.float32, False)} and set(arrays) == {(torch.float32, False)}
    assert all(last < first for first, last in errors), errors
