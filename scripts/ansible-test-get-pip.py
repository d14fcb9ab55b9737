# Stand-in for ansible-test's pip bootstrap script.
#
# ansible-test --venv downloads get-pip.py from a host this machine cannot
# reach, then runs it inside a fresh virtual environment as
# "get_pip.py [--disable-pip-version-check] pip==X [--no-setuptools] [--no-wheel]".
# This does the same from what Python ships: ensurepip installs its bundled
# pip, which then installs the requested pip from the package index.
#
# ansible-test runs pip with a scrubbed environment (PIP_CERT and friends are
# dropped), so the system's CA bundle is written into the environment's own
# pip.conf, where every later pip run in it finds it.
import ensurepip
import os
import subprocess
import sys

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

if os.path.exists(SYSTEM_CA_BUNDLE):
    with open(os.path.join(sys.prefix, "pip.conf"), "w", encoding="utf-8") as config:
        config.write("[global]\ncert = %s\n" % SYSTEM_CA_BUNDLE)
ensurepip.bootstrap()
# ensurepip hides pip's configuration files from itself by setting this; undo it.
os.environ.pop("PIP_CONFIG_FILE", None)
ARGS = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--quiet"] + ARGS))
