"""fmvr.provenance: the source hash follows the code and works where only some folders are installed."""

from __future__ import annotations

from fmvr.provenance import machine, run_record, source_sha256


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


def test_the_machine_is_named_with_the_flags_that_change_timings(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 amx_bf16 sse\n"
    )
    got = machine(info)
    assert got["cpu"] == "Intel(R) Xeon(R) Processor"
    assert got["cpu_flags"] == ["amx_bf16", "avx2"]  # in TIMING_FLAGS' order, the rest dropped
    info.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f\n")
    assert machine(info)["cpu_flags"] == ["avx512f", "avx2"]
    assert run_record(["x.py"])["machine"]["logical_cpus"] >= 1
