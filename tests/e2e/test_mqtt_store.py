"""The durable MQTT store (`[mqtt] store`, docs/configuration.md "Durability") in the real binary.

What the node itself does with the file: opens (creating) it at start and holds it locked, so a
second node on the same file is refused; releases it on shutdown, so a restart opens it again;
and refuses to start, naming the path, when the file is not a store, is corrupt, or its directory
does not exist. The store's own contract (batched commits, kill -9 mid-write keeping every write
acknowledged durable) is tested in crates/warren/src/mqtt_store.rs.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import Warren, wait_until, warren_bin


@pytest.fixture(autouse=True)
def binary_has_the_store(tmp_path: Path):
    """A binary built without the cargo feature `mqtt-store` refuses the key, naming the
    feature: nothing here applies to it."""
    cfg = tmp_path / "probe.toml"
    cfg.write_text('[mqtt]\nstore = "probe.redb"\n')
    check = subprocess.run([str(warren_bin()), "check-config", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0 and "mqtt-store" in check.stdout + check.stderr:
        pytest.skip("this warren binary was built without the MQTT store (cargo feature mqtt-store)")


def config(d: Path, store: Path) -> Path:
    path = d / "warren.toml"
    path.write_text(f'[mqtt]\nstore = "{store}"\n')
    return path


def start(cfg: Path) -> Warren:
    return Warren("--config", str(cfg), listen=["mqtt"], http=False)


def exits_naming(w: Warren, text: str) -> str:
    """Wait for a node that must not start to exit non-zero; its stderr, which names `text`."""
    wait_until(lambda: not w.running(), timeout=20, msg="the node should refuse to start")
    assert w.proc.returncode != 0
    err = w.log()
    assert text in err, err
    return err


def test_the_store_is_created_held_by_one_node_and_reopened_after_a_restart():
    d = Path(tempfile.mkdtemp(prefix="warren-store-"))
    store = d / "mqtt.redb"
    cfg = config(d, store)
    first = start(cfg).wait_ready()
    assert store.is_file() and store.stat().st_size > 0
    second = start(cfg)
    err = exits_naming(second, str(store))
    assert "has it open" in err, err
    assert first.terminate() == 0
    again = start(cfg).wait_ready()
    assert again.terminate() == 0


def test_a_file_that_is_not_a_store_stops_the_node_naming_it():
    d = Path(tempfile.mkdtemp(prefix="warren-store-"))
    store = d / "not-a-store.redb"
    store.write_bytes(b"\x5a" * 65536)
    cfg = config(d, store)
    # the key itself is valid: check-config accepts it (it does not open the file)
    check = subprocess.run([str(warren_bin()), "check-config", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    exits_naming(start(cfg), str(store))
    # the file is left as it was, for its owner to look at
    assert store.read_bytes() == b"\x5a" * 65536


def test_a_store_in_a_missing_directory_stops_the_node_naming_it():
    d = Path(tempfile.mkdtemp(prefix="warren-store-"))
    store = d / "no-such-dir" / "mqtt.redb"
    exits_naming(start(config(d, store)), str(store))


def test_an_empty_store_path_is_refused_by_check_config():
    d = Path(tempfile.mkdtemp(prefix="warren-store-"))
    cfg = d / "warren.toml"
    cfg.write_text('[mqtt]\nstore = ""\n')
    check = subprocess.run([str(warren_bin()), "check-config", str(cfg)], capture_output=True, text=True)
    assert check.returncode != 0
    assert "mqtt.store: must name a file" in check.stdout + check.stderr
