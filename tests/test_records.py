"""Cached records: read back only for the settings that made them, written whole or not at all."""

from __future__ import annotations

import json

from speechmimic import records


def test_a_record_is_read_back_only_for_what_made_it(tmp_path):
    path = tmp_path / "cell.json"
    made_by = {"cell": {"budget": "10%", "seeds": (0, 1)}, "config": {"steps": 5}}
    assert records.read(path, made_by) is None  # nothing yet
    whole = records.write(path, made_by, {"result": {"r2": 0.5}})
    assert whole == {**made_by, "result": {"r2": 0.5}}
    # compared as JSON stores them: the tuple comes back as a list and still matches
    assert records.read(path, made_by)["result"] == {"r2": 0.5}
    assert records.read(path, {**made_by, "config": {"steps": 6}}) is None
    assert records.read(path, {**made_by, "measure_id": "probes"}) is None  # a key it never had
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.json"]  # no temporary file left
    assert json.loads(path.read_text())["cell"]["seeds"] == [0, 1]
