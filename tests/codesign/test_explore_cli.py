"""`cimattn explore` as a user runs it: the analytic space from a file, resume, one-line errors."""


import yaml

SPACE = {
    "name": "zdt", "evaluator": "analytic",
    "parameters": [{"name": "x0", "path": "x0", "type": "float", "low": 0, "high": 1},
                   {"name": "x1", "path": "x1", "type": "int", "low": 0, "high": 10}],
    "objectives": [{"metric": "f1", "log": False}, {"metric": "f2", "log": False}],
}




def test_explore_writes_the_study_and_resumes(cli, monkeypatch, capsys, tmp_path):
    space = tmp_path / "zdt.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["explore", "--space", space, "--budget", 5, "--out", tmp_path / "study", "--method", "random,grid,tpe", "--quiet"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "| random | 5 |" in out and "Pareto front" in out
    assert (tmp_path / "study" / "hypervolume.png").is_file()
    code, out2, _ = cli(*args)  # resumed with nothing left to do: the same table
    assert code == 0 and out2 == out


def test_explore_bad_space_is_one_line(cli, monkeypatch, capsys, tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(SPACE | {"parameters": [{"name": "x0", "path": "x0", "type": "float", "low": 1, "high": 0}]}))
    code, _, err = cli("explore", "--space", space, "--budget", 2, "--out", tmp_path / "s")
    assert code == 2 and err.strip().count("\n") == 0 and "empty range" in err


def test_explore_unknown_method(cli, monkeypatch, capsys, tmp_path):
    space = tmp_path / "zdt.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    code, _, err = cli("explore", "--space", space, "--budget", 2, "--out", tmp_path / "s", "--method", "cmaes")
    assert code == 2 and "unknown method 'cmaes'" in err
