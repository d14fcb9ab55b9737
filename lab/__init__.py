# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab: the embedded AWS endpoint (moto behind the fault proxy) and real local test hosts.

It serves the demo (scripts/demo.sh), the benchmarks, the Molecule scenarios and the tests; none of it is
part of the collection's plugins or roles. ``lab.hosts`` boots the test hosts; the other modules drive the
endpoint and the collection (see docs/testhosts.md and docs/development.md).
"""
