"""Which offline folders belong to a run, whatever second each attempt started in."""

from editlab.experiments.wandb_logger import attempt_folders, free_name


def test_attempt_folders_include_same_second_restarts_and_no_other_run(tmp_path):
    ours = ["offline-run-20261207_092151-abc123", "offline-run-20261207_092151-abc123-1",
            "offline-run-20261207_092209-abc123"]
    others = ["offline-run-20261207_092151-abc1234", "offline-run-20261207_092151-xabc123",
              "run-20261207_092151-abc123", "offline-run-20261207_092151-abc123-x"]
    for name in ours + others:
        (tmp_path / name).mkdir()
    assert [p.name for p in attempt_folders(tmp_path, "abc123")] == sorted(ours)


def test_free_name_never_reuses_a_taken_name(tmp_path):
    target = tmp_path / "offline-run-20261207_092151-abc123"
    assert free_name(target) == target
    target.mkdir()
    (tmp_path / f"{target.name}-1").mkdir()
    assert free_name(target) == tmp_path / f"{target.name}-2"
