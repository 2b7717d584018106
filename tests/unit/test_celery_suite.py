"""The harness that holds Celery's integration suite on -P asyncsql to prefork's results."""

import json

import pytest

from tests.celery_suite import left_out, run


@pytest.fixture
def reference(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "ROOT", tmp_path)
    path = tmp_path / "reference" / "9.9.9" / "sync.txt"
    path.parent.mkdir(parents=True)
    path.write_text("t/a.py::test_one\nt/a.py::test_two\nt/a.py::test_left\n")
    return path


def _results(tmp_path, outcomes, left=()):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"outcomes": outcomes, "reruns": 1, "left_out": len(left),
                                "left_out_ids": list(left)}))
    return path


def test_a_test_that_passed_on_prefork_must_pass(tmp_path, reference, capsys):
    results = _results(tmp_path, {"t/a.py::test_one": "passed", "t/a.py::test_two": "failed"},
                       left=["t/a.py::test_left"])
    row, held = run.judge("9.9.9", "sync", "asyncsql", results, record=False)
    assert not held
    assert "passed on prefork, failed here: t/a.py::test_two" in capsys.readouterr().out
    assert row == "| sync | asyncsql | 2 | 1 | 1 | 0 | 1 | 1 |"


def test_left_out_and_extra_tests_do_not_fail_the_pass(tmp_path, reference):
    results = _results(tmp_path, {"t/a.py::test_one": "passed", "t/a.py::test_two": "passed",
                                  "t/a.py::test_new": "failed"}, left=["t/a.py::test_left"])
    assert run.judge("9.9.9", "async", "asyncsql", results, record=False)[1]


def test_a_test_not_run_is_a_failure(tmp_path, reference, capsys):
    results = _results(tmp_path, {"t/a.py::test_one": "passed", "t/a.py::test_left": "passed"})
    assert not run.judge("9.9.9", "sync", "asyncsql", results, record=False)[1]
    assert "not run here: t/a.py::test_two" in capsys.readouterr().out


def test_record_writes_what_passed(tmp_path, reference):
    results = _results(tmp_path, {"t/a.py::test_b": "passed", "t/a.py::test_a": "passed",
                                  "t/a.py::test_c": "skipped"})
    run.judge("9.9.9", "sync", "prefork", results, record=True)
    assert reference.read_text() == "t/a.py::test_a\nt/a.py::test_b\n"


def test_left_out_keys_match_a_test_its_parameters_or_its_module():
    left_out.ANY_POOL["t/x.py::test_k"] = "why"
    try:
        assert left_out.reason("t/x.py::test_k", "asyncsql", False) == "why"
        assert left_out.reason("t/x.py::test_k[1-2]", "asyncsql", False) == "why"
        assert left_out.reason("t/x.py::test_kk", "asyncsql", False) is None
    finally:
        del left_out.ANY_POOL["t/x.py::test_k"]
    assert left_out.reason("t/integration/test_backend.py", "prefork", False)


def test_every_reason_says_why_and_asyncsql_ones_name_a_docs_section():
    for key, why in {**left_out.ANY_POOL, **left_out.ASYNCSQL,
                     **left_out.ASYNC_BODIES}.items():
        assert key.startswith("t/integration/") and len(why) > 40, key
    for why in {**left_out.ASYNCSQL, **left_out.ASYNC_BODIES}.values():
        assert "docs/" in why, why


def test_a_pool_difference_leaves_a_test_out_of_asyncsql_passes_only():
    test_retry = "t/integration/test_tasks.py::test_tasks::test_retry"
    assert left_out.reason(test_retry, "asyncsql", False)
    assert left_out.reason(test_retry, "asyncsql", True)
    assert left_out.reason(test_retry, "prefork", False) is None


def test_a_reference_id_with_spaces_is_one_test(tmp_path, reference):
    reference.write_text("t/a.py::test_p[body is a chain]\n")
    results = _results(tmp_path, {"t/a.py::test_p[body is a chain]": "passed"})
    assert run.judge("9.9.9", "sync", "asyncsql", results, record=False)[1]
    results = _results(tmp_path, {"t/a.py::test_p[body is a chain]": "failed"})
    assert not run.judge("9.9.9", "sync", "asyncsql", results, record=False)[1]
