"""`fedpir train` (fedpir.commands.train) on a site of the synthetic federation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedpir.commands import main
from fedpir.commands import train as train_cli


def train(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(list(argv)))


def test_train_cli_private_rounds_then_budget_refusal(small_federation: Path, tmp_path: Path) -> None:
    site = small_federation / "site-1"
    policy = tmp_path / "policy.json"  # the default policy, but a budget of 6 and its noise planned over three rounds
    policy.write_text(json.dumps({"max-rounds": 3, "max-epsilon": 6.0}))
    common = ["--site", str(site), "--stage", "finetune", "--task", "classification", "--size", "16",
              "--state-dir", str(tmp_path / "state"), "--privacy-policy", str(policy), "--no-progress"]
    out = tmp_path / "run.json"
    assert train(*common, "--rounds", "2", "--epsilon", "6", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    assert result["config"]["modalities"] == vocab and result["config"]["dp"]["target_epsilon"] == 6.0
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 6.0
    assert {"loss_total", "heldout_accuracy", "heldout_loss_classification", "steps", "seconds"} <= set(rounds[0])
    # metrics are on held-out patients, never on the ones trained on
    assert result["config"]["train_patients"] == 6 and result["config"]["heldout_patients"] == 2
    assert rounds[0]["n_patients"] == 6 and rounds[0]["heldout_n_patients"] == 2
    # a further round, with the least noise the policy allows, would overspend the budget: refused
    assert train(*common, "--rounds", "1", "--epsilon", "6", "--noise-multiplier", "0.5",
                 "--out", str(out)) == train_cli.EXIT_BUDGET
    assert json.loads(out.read_text())["rounds"] == []
    ledger = (tmp_path / "state" / "privacy_ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2


@pytest.mark.parametrize(("flags", "rule"), [(["--no-dp"], "dp-required"), (["--epsilon", "20"], "max-epsilon"),
                                             (["--reproducible-noise"], "secret-noise"), (["--rounds", "33"], "max-rounds")])
def test_train_with_a_nodes_state_folder_obeys_the_nodes_policy(small_federation: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], flags: list[str],
                                                                rule: str) -> None:
    state = tmp_path / "state"
    argv = ["train", "--site", str(small_federation / "site-1"), "--size", "16", "--state-dir", str(state), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"rule {rule}" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not state.exists()  # nothing written: no signed entry, no key


def test_a_node_trains_no_more_rounds_in_its_life_than_its_policy_allows(small_federation: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"max-rounds": 1}))
    argv = ["train", "--site", str(small_federation / "site-1"), "--size", "16", "--state-dir", str(tmp_path / "state"),
            "--privacy-policy", str(policy), "--rounds", "1", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2  # a second run, however small: the site's life allows one round
    assert "rule max-rounds" in capsys.readouterr().err
    assert len((tmp_path / "state" / "privacy_ledger.jsonl").read_text().splitlines()) == 1


def test_the_nodes_own_policy_file_decides(small_federation: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"  # a research node's policy, which allows what the default refuses
    policy.write_text(json.dumps({"dp-required": False, "max-epsilon": 20, "secret-noise-required": False}))
    state = tmp_path / "state"
    argv = ["train", "--site", str(small_federation / "site-1"), "--size", "16", "--state-dir", str(state),
            "--privacy-policy", str(policy), "--no-dp", "--no-progress"]
    assert main(argv) == 0
    (entry,) = [json.loads(line) for line in (state / "privacy_ledger.jsonl").read_text().splitlines()]
    from fedpir.privacy.policy import load_policy

    assert entry["dp"] is False and entry["policy_sha256"] == load_policy(policy).sha256  # stamped with its policy


def test_train_cli_without_dp(small_federation: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["--site", str(small_federation / "site-2"), "--modalities", "t1,t2,flair,pd", "--no-dp",
            "--stage", "finetune", "--task", "segmentation", "--size", "16", "--out", str(out), "--no-progress"]
    assert train(*argv) == 0
    (record,) = json.loads(out.read_text())["rounds"]
    assert record["dp"] == 0.0 and "epsilon" not in record and "heldout_dice" in record
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        train("--site", str(small_federation / "site-2"), "--stage", "finetune", "--rounds", "0")


def test_train_cli_reads_a_brats_folder_without_manifest(tmp_path: Path) -> None:
    """Every layout that `fedpir validate` accepts trains: a BraTS-style folder has no manifest."""
    import nibabel as nib
    import numpy as np

    site = tmp_path / "brats"
    rng = np.random.default_rng(0)
    for k in range(3):
        case = f"BraTS-GLI-0000{k}-000"
        for i, tag in enumerate(("t1n", "t2w", "t2f")):
            data = (100.0 * (i + 1) * (1 + 0.1 * rng.standard_normal((16, 16, 16)))).astype(np.float32)
            (site / case).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), site / case / f"{case}-{tag}.nii.gz")
        mask = np.zeros((16, 16, 16), np.uint8)
        mask[4:9, 4:9, 4:9] = 2
        nib.save(nib.Nifti1Image(mask, np.eye(4)), site / case / f"{case}-seg.nii.gz")
    out = tmp_path / "run.json"
    assert train("--site", str(site), "--no-dp", "--stage", "finetune", "--task", "segmentation", "--size", "16",
                 "--out", str(out), "--no-progress") == 0
    result = json.loads(out.read_text())
    assert sorted(result["config"]["modalities"]) == ["flair", "t1", "t2"] and "heldout_dice" in result["rounds"][0]


def test_user_errors_print_one_line_and_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    cases = [
        ["train", "--site", str(tmp_path / "missing"), "--no-progress"],
        ["train", "--site", str(tmp_path), "--no-progress"],
        ["simulate", "--out", str(tmp_path / "o"), "--finetune-trainable", "everything"],
        ["simulate", "--out", str(tmp_path / "o"), "--strategy", "nonsense"],
        ["simulate", "--out", str(tmp_path / "o"), "--methods", "fedpir,bogus"],
        ["simulate", "--out", str(tmp_path / "o"), "--federation", str(tmp_path / "none")],
        ["simulate", "--out", str(tmp_path / "o"), "--warm-start", str(tmp_path / "none.pt")],
        ["train", "--site", str(tmp_path), "--accountant", "gauss"],
        ["pretrain-public", "--out", str(tmp_path / "w.pt"), "--modality-dropout", "x"],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "fedpir", *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["simulate", "--help"], ["train", "--help"], ["pretrain-public", "--help"],
    ["simulate", "--strategy", "nonsense"], ["simulate", "--methods", "bogus"], ["simulate", "--size", "-"],
])
def test_help_and_bad_arguments_answer_before_torch_loads(argv: list[str]) -> None:
    """What makes `fedpir --help` and a rejected flag answer at once: neither imports torch, Flower,
    MONAI or even numpy (the times themselves are a benchmark: python -m benchmarks.cost.cli)."""
    import subprocess
    import sys

    code = ("import sys\nfrom fedpir.commands import main\ntry:\n    main(" + repr(argv) + ")\nexcept SystemExit:\n    pass\n"
            "print(*(m in sys.modules for m in ('torch', 'flwr', 'monai', 'numpy')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "False False False False", proc.stderr
