"""The Flower app project (``pyproject.toml``) that ``flwr run`` builds into a FAB.

The app contains no code. Its components name the ClientApp and ServerApp of the
installed fl2ora package, so fl2ora (with the ``flower`` extra) must be installed
wherever a SuperLink or SuperNode runs. The repository's ``flower_app/`` folder
contains a copy of :data:`APP_PYPROJECT` for running ``flwr run flower_app ...`` by hand.
"""

from __future__ import annotations

from pathlib import Path

APP_PYPROJECT = """\
# The fl2ora Flower app. `flwr run flower_app <connection>` packs this file into a FAB.
# The components come from the installed fl2ora package, which every SuperLink and
# SuperNode environment needs (pip install 'fl2ora[flower]').
[project]
name = "fl2ora-flower"
version = "0.1.0"
description = "Federated, calibrated fine-tuning of CLIP (fl2ora) on Flower"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "fl2ora"

[tool.flwr.app.components]
serverapp = "fl2ora.runtime.flower.server_app:app"
clientapp = "fl2ora.runtime.flower.client_app:app"

# Override with `flwr run ... --run-config 'key=value'` or a TOML file of such keys.
[tool.flwr.app.config]
config = ""                  # fl2ora YAML on the SuperLink host (absolute path); "" = defaults
output = "runs/flower"       # run directory; use an absolute path
overwrite = false            # replace a run directory that already contains a run
min-replies = 1              # valid updates a round needs to change the global model
round-timeout = 600.0        # seconds to wait for the replies of one round
node-wait-timeout = 300.0    # seconds to wait before round 1 for a node per partition
"""


def write_app_project(folder: str | Path) -> Path:
    """Write :data:`APP_PYPROJECT` as ``folder/pyproject.toml`` and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder
