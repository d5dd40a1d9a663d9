"""Distillation from the unfused model while a fused decoder fine-tunes: the loss, and the CLI option."""

import json
import math

import pytest
import torch
from test_generation import FAST, TASK, model_dir, run
from tiny_models import build, write_data_to_text_task

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.training.distill import Teacher, next_token_kl


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d2t"
    write_data_to_text_task(path)
    return path


def test_next_token_kl_matches_a_hand_computed_value():
    student = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    for temperature in (1.0, 2.0):
        expected = []
        for s, t in zip(student[0, :2].tolist(), teacher[0, :2].tolist()):
            zs = sum(math.exp(v / temperature) for v in s)
            zt = sum(math.exp(v / temperature) for v in t)
            p = [math.exp(v / temperature) / zt for v in t]
            q = [math.exp(v / temperature) / zs for v in s]
            expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        value = next_token_kl(student, teacher, mask, temperature)
        assert float(value) == pytest.approx(temperature**2 * sum(expected) / 2, rel=1e-6)
    assert float(next_token_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-7)


def test_teacher_loss_mixes_the_task_loss_and_the_kl_on_a_tiny_decoder():
    torch.manual_seed(0)
    original = build("llama").eval()
    fused = build("llama").eval()
    fused.load_state_dict(original.state_dict())
    fuse(fused, FusionConfig(ratio=0.5))
    ids = torch.randint(0, original.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    loss, outputs = Teacher(original, weight=0.25).loss(fused, inputs)
    kl = next_token_kl(outputs.logits, original(**inputs).logits, mask)
    assert float(kl.detach()) > 1e-7  # the fused model's distribution differs from the original's
    assert float(loss) == pytest.approx(0.75 * float(outputs.loss) + 0.25 * float(kl), rel=1e-5)
    assert all(not p.requires_grad for p in original.parameters())
    same, _ = Teacher(original, weight=1.0).loss(original, inputs)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_finetune_with_a_teacher_records_it_and_changes_training(capsys, tmp_path, task_dir):
    base = model_dir(tmp_path, "llama")
    common = [*TASK, "--data", task_dir, "--ratio", "0.5", "--epochs", "1", "--json", *FAST]
    code, plain, err = run(capsys, "finetune", base, *common, "--out", tmp_path / "plain")
    assert code == 0, err
    code, taught, err = run(
        capsys, "finetune", base, *common, "--teacher-weight", "0.5", "--out", tmp_path / "taught"
    )
    assert code == 0, err
    run_record = json.loads((tmp_path / "taught" / "run.json").read_text())
    assert run_record["teacher_weight"] == 0.5 and run_record["teacher_temperature"] == 1.0
    assert json.loads(taught)["epochs"][-1]["loss"] != json.loads(plain)["epochs"][-1]["loss"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher-weight", "0.5", "--method", "full"], "needs a base model, a fusion method"),
        (["--teacher-weight", "1.5"], "teacher weight must be in [0, 1]"),
        (["--teacher-weight", "0.5", "--teacher-temperature", "0"], "temperature must be above 0"),
    ],
)
def test_bad_teacher_options_exit_2_before_writing(capsys, tmp_path, task_dir, args, message):
    base = model_dir(tmp_path, "llama")
    code, _, stderr = run(capsys, "finetune", base, *TASK, "--data", task_dir, *args, "--out", tmp_path / "r")
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "r").exists()
