"""fmvr.provenance: the source hash follows the code and works where only some folders are installed."""

from __future__ import annotations

from fmvr.provenance import source_sha256


def test_the_source_hash_changes_with_a_file_and_tolerates_absent_folders(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "a.py").write_text("x = 1\n")
    before = source_sha256(("runtime", "train"), root=tmp_path)  # train/ absent (an installed runtime)
    assert before == source_sha256(("runtime", "train"), root=tmp_path)
    (tmp_path / "runtime" / "a.py").write_text("x = 2\n")
    assert source_sha256(("runtime", "train"), root=tmp_path) != before
    (tmp_path / "train").mkdir()  # a folder appearing changes it too
    (tmp_path / "train" / "b.py").write_text("")
    assert source_sha256(("runtime", "train"), root=tmp_path) != source_sha256(("runtime",), root=tmp_path)
