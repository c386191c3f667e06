"""The coordinator's config and client faults fixed in session 26, end to end: a relative
``identity_dir``, ``data_dir`` or ``[api] token_file`` in the coordinator's TOML is taken from the
file's folder, and ``meshinfer-coord --data-dir`` on the runtime file a SIGKILLed coordinator left
says that none runs rather than "cannot reach". (The unit-sized checks of the same faults are in
``tests/test_node_fixes26.py``.)

A real ``meshinfer-coord serve`` child started from another working directory, the real CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from coordinator import cli as coord_cli
from coordinator.config import config_from_dict, load_config
from meshinfer.testing.cluster import LocalCluster

_RELATIVE = (
    '[coordinator]\nidentity_dir = "nodes/coord"\ndata_dir = "data/coord"\n'
    '[discovery]\nmdns = false\n[membership]\npreset = "test"\n'
    '[api]\nlisten = "127.0.0.1:0"\ntoken_file = "fleet/api-token"\n'
)


def test_a_coordinator_started_elsewhere_finds_its_files_and_a_killed_one_is_told_apart(
    tmp_path, capsys, monkeypatch
):
    root = tmp_path / "fleet-root"
    cluster = LocalCluster(root, fleet_id="coord-relative")  # root/fleet/api-token
    cluster.enroll("coord", ("coordinator",))  # root/nodes/coord
    config = root / "coord.toml"
    config.write_text(_RELATIVE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon inherits this working directory
    cluster.configs["coord"] = Path(os.path.relpath(config, elsewhere))
    data_dir = root / "data" / "coord"
    argv = ["nodes", "--data-dir", str(data_dir)]
    with cluster:
        first = cluster.start_coordinator("coord")
        recorded = json.loads((data_dir / "runtime.json").read_text())
        assert recorded["pid"] == first.proc.pid
        assert recorded["token_file"] == str((root / "fleet" / "api-token").resolve())
        assert coord_cli.main(argv) == 0
        capsys.readouterr()

        cluster.kill("coord")  # SIGKILL: the runtime file stays behind
        assert (data_dir / "runtime.json").exists()
        assert coord_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"no coordinator running (stale runtime file from pid {first.proc.pid}" in err
        assert "cannot reach" not in err

        second = cluster.start_coordinator("coord")  # records itself once ready
        assert second.proc.pid != first.proc.pid
        assert coord_cli.main(argv) == 0


def test_paths_stay_as_written_without_a_file_and_absolute_ones_are_kept(tmp_path):
    data = {"coordinator": {"data_dir": "data"}, "api": {"token_file": "api-token"}}
    assert config_from_dict(data).coordinator.data_dir == "data"  # no file: no folder to use
    assert config_from_dict(data).api.token_file == "api-token"
    config = tmp_path / "coord.toml"
    config.write_text(f'[coordinator]\ndata_dir = "{tmp_path / "d"}"\n')
    loaded = load_config(config)
    assert loaded.coordinator.data_dir == str(tmp_path / "d")
    assert loaded.coordinator.identity_dir == ""  # empty stays empty (a temp dir / none)
    assert loaded.api.token_file == ""
