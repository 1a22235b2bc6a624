"""The file to give `mitmdump -s`: mitmproxy loads a file, not a package, so this shim only imports it.

    mitmdump -s metrion_addon/mitm_script.py --mode reverse:https://api.anthropic.com@127.0.0.1:8080 \
        --set connection_strategy=lazy --set metrion_config=config.example.yaml
"""

import sys
from pathlib import Path

try:
    from metrion_addon.addon import Metrion
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from metrion_addon.addon import Metrion

addons = [Metrion()]
