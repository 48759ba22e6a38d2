"""The operator docs and the example inventory match the settings declaration."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.settings import SETTINGS, markdown_table

REPO = Path(__file__).resolve().parent.parent
TABLE = re.compile(r"<!-- settings-table:start -->\n(.*?)<!-- settings-table:end -->", re.S)


def test_readme_settings_table_is_generated():
    readme = (REPO / "README.md").read_text()

    match = TABLE.search(readme)

    assert match, "README.md lacks the settings-table markers"
    assert match.group(1) == markdown_table(), (
        "README settings table is stale; regenerate it with "
        "`.venv/bin/python -m melody_deploy.settings`"
    )


def load_example():
    namespace = runpy.run_path(str(REPO / "inventories" / "tres.py"))
    specs = [HostSpec(name, ("superlink",), data) for name, data in namespace["superlink"]]
    specs += [HostSpec(name, ("supernodes",), data) for name, data in namespace["supernodes"]]
    return specs


def test_example_inventory_is_valid():
    federation = validate_inventory(load_example())

    assert len(federation.supernodes) == 2


def test_example_inventory_sets_every_setting_to_its_default():
    specs = load_example()
    superlink_data = specs[0].data
    supernode_data = specs[1].data

    for setting in SETTINGS:
        data = supernode_data if setting.role == "supernode" else superlink_data
        assert setting.name in data, f"inventories/tres.py does not list {setting.name}"
        # The example must turn TLS off until TLS support lands, and warns about it.
        if setting.required or setting.default is None or setting.name == "melody_insecure":
            continue
        shown = data[setting.name]
        default = list(setting.default) if isinstance(setting.default, tuple) else setting.default
        assert shown == default, (
            f"inventories/tres.py shows {setting.name} = {shown!r}, but the default is {default!r}"
        )
