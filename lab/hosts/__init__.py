# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real test hosts for Molecule: Debian 12 systemd-nspawn containers in network
namespaces, with a caching apt proxy and relays on the harness side.

Entry point: ``python -m lab.hosts --help``; documentation: docs/testhosts.md.
"""
