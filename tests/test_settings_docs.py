"""The operator docs and the example inventory match the settings declaration."""

from __future__ import annotations

import re
from pathlib import Path

from melody_deploy.preflight import validate_inventory
from melody_deploy.researcher import load_inventory
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
    return load_inventory(REPO / "inventories" / "tres.py")


def test_example_inventory_is_valid():
    federation = validate_inventory(load_example())

    assert len(federation.supernodes) == 2


def test_example_inventory_sets_every_setting_to_its_default():
    specs = load_example()
    superlink_data = next(spec.data for spec in specs if "superlink" in spec.groups)
    supernode_data = next(spec.data for spec in specs if "supernodes" in spec.groups)

    for setting in SETTINGS:
        data = supernode_data if setting.role == "supernode" else superlink_data
        assert setting.name in data, f"inventories/tres.py does not list {setting.name}"
        # The example must turn TLS off until TLS support lands, and warns about it.
        if setting.required or setting.default is None or setting.name == "melody_insecure":
            continue
        listed = data[setting.name]
        default = list(setting.default) if isinstance(setting.default, tuple) else setting.default
        assert listed == default, (
            f"inventories/tres.py lists {setting.name} = {listed!r}, but the default is {default!r}"
        )
