"""Built-in datasets: gsm_symbolic from reasoning_gym, BIG-bench tasks streamed out of the sdist tarball."""

import io
import json
import os
import re
import tarfile

import pytest

from jaxmoelora.data import DataConfig, bigbench_records, build_records, load_records
from jaxmoelora.data import builders
from jaxmoelora.errors import DataError

FAKE_TASKS = {
    "qa_wikidata": {"examples": [{"input": "The capital of Peru is", "target": ["Lima", "Lima, Peru"]},
                                 {"input": "The language of Brazil is", "target": "Portuguese"}]},
    "strategyqa": {"examples": [{"input": "Can fish walk?", "target_scores": {"Yes": 0, "No": 1}}]},
    "crass_ai": {"append_choices_to_input": False,
                 "examples": [{"input": "What if?", "target_scores": {"a": 1, "b": 0}}]},
    "elementary_math_qa": {"name": "elementary_math_qa", "examples": []},
    "elementary_math_qa/question_only": {"examples": [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(10)]},
}  # fmt: skip


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache dir whose downloads/ holds a small tarball with the sdist's layout (nothing is downloaded)."""
    monkeypatch.setenv("JAXMOELORA_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    with tarfile.open(tmp_path / "downloads" / builders.BIGBENCH_TARBALL, "w:gz") as tar:
        for name, spec in [("README.md", None), *FAKE_TASKS.items()]:
            data = b"readme" if spec is None else json.dumps(spec).encode()
            path = "bigbench-1.0.0/" + (name if spec is None else f"bigbench/benchmark_tasks/{name}/task.json")
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_gsm_symbolic_records_have_integer_answers_and_worked_solutions():
    records = build_records("gsm_symbolic", 12, seed=0)
    assert len(records) == 12
    for r in records:
        assert re.fullmatch(r"-?\d+", r["answer"]) and r["answers"] == [r["answer"]]
        assert r["response"].rstrip().endswith(f"#### {r['answer']}")
        assert r["task_type"] == 0 and r["prompt"].strip()
    assert build_records("gsm_symbolic", 12, seed=0) == records
    assert build_records("gsm_symbolic", 12, seed=1) != records


def test_bigbench_targets_choices_and_task_types(fake_cache):
    wikidata = bigbench_records("qa_wikidata")
    assert [(r["prompt"], r["response"], r["answers"], r["task_type"]) for r in wikidata] == [
        ("The capital of Peru is", "Lima", ["Lima", "Lima, Peru"], 1),
        ("The language of Brazil is", "Portuguese", ["Portuguese"], 1),
    ]
    (mc,) = bigbench_records("strategyqa")
    assert (mc["prompt"], mc["response"], mc["task_type"]) == ("Can fish walk?\n  choice: No\n  choice: Yes", "No", 0)
    (no_choices,) = bigbench_records("crass_ai")
    assert (no_choices["prompt"], no_choices["response"]) == ("What if?", "a")
    assert (fake_cache / "bigbench" / "qa_wikidata.json").exists()


def test_bigbench_subtasks_and_seeded_samples(fake_cache):
    records = bigbench_records("elementary_math_qa/question_only", size=4, seed=0)
    assert len(records) == 4 and records == bigbench_records("elementary_math_qa/question_only", size=4, seed=0)
    assert (fake_cache / "bigbench" / "elementary_math_qa" / "question_only.json").exists()
    with pytest.raises(DataError, match="subtasks: bigbench:elementary_math_qa/question_only"):
        bigbench_records("elementary_math_qa")


def test_unknown_bigbench_task_suggests_close_names(fake_cache):
    with pytest.raises(DataError, match="close names: qa_wikidata"):
        bigbench_records("qa_wikidat")


def test_bigbench_builder_through_the_config(fake_cache):
    records = load_records(DataConfig(builder="bigbench:qa_wikidata", builder_size=1))
    assert len(records) == 1 and records[0]["task_type"] == 1


def test_offline_download_says_what_is_missing_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMOELORA_CACHE", str(tmp_path))
    monkeypatch.setattr(builders, "_pip_download", lambda downloads: False)

    def offline(url, timeout=None):
        raise builders.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(builders.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        bigbench_records("qa_wikidata")
    message = str(e.value)
    tarball = tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    assert f"Missing: {tarball}" in message
    assert f"curl -L -o {tarball} {builders.BIGBENCH_URL}" in message
    assert "pip download --no-deps --no-binary :all: bigbench==1.0.0" in message
    assert not tarball.exists() and not tarball.with_name(tarball.name + ".partial").exists()


def test_download_streams_the_sdist_into_the_cache_once(fake_cache, monkeypatch):
    tarball = fake_cache / "downloads" / builders.BIGBENCH_TARBALL
    payload = tarball.read_bytes()
    tarball.unlink()
    requested = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    def serve(url, timeout=None):
        requested.append(url)
        return Response(payload)

    monkeypatch.setattr(builders, "_pip_download", lambda downloads: False)
    monkeypatch.setattr(builders.urllib.request, "urlopen", serve)
    assert len(bigbench_records("qa_wikidata")) == 2
    assert len(bigbench_records("strategyqa")) == 1  # the tarball is reused, not fetched again
    assert requested == [builders.BIGBENCH_URL] and tarball.read_bytes() == payload


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXMOELORA_TEST_BIGBENCH") != "1",
                    reason="downloads the 358 MB BIG-bench sdist; set JAXMOELORA_TEST_BIGBENCH=1")  # fmt: skip
def test_real_bigbench_qa_wikidata():
    records = bigbench_records("qa_wikidata")
    assert len(records) > 20000 and all(r["task_type"] == 1 for r in records)
