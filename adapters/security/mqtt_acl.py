"""MQTT principals and topic ACLs, one description for the embedded amqtt broker and Mosquitto.

Three principals (RELIABILITY.md SEC-07): the controller reads everything under the prefix and
is the only one that writes `schedule`, `status` and `operator/result/#`; telemetry publishers
may write only inputs; the operator may write only `operator/command` and read the results.
`deploy/mosquitto/acl` says the same in Mosquitto's syntax (a test compares the two).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

CONTROLLER, TELEMETRY, OPERATOR = "voltpool", "telemetry", "operator"


@dataclass(frozen=True, slots=True)
class TopicRules:
    """What one principal may publish and subscribe to (MQTT filters, `+` and `#` allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def __post_init__(self) -> None:
        for topic in (*self.publish, *self.subscribe):
            if not topic or "#" in topic[:-1] or topic.startswith("/"):
                raise ValueError(f"bad ACL topic filter {topic!r}")


def acl(prefix: str) -> dict[str, TopicRules]:
    """The ACL of every principal for topics under `prefix`."""
    inputs = (
        f"{prefix}/events",
        f"{prefix}/vehicle/+/soc",
        f"{prefix}/vehicle/+/departure",
        f"{prefix}/price",
        f"{prefix}/site/headroom",
        f"{prefix}/site/load",
    )
    published = (f"{prefix}/schedule", f"{prefix}/status")
    return {
        CONTROLLER: TopicRules(publish=(f"{prefix}/#",), subscribe=(f"{prefix}/#",)),
        TELEMETRY: TopicRules(publish=inputs, subscribe=published),
        OPERATOR: TopicRules(
            publish=(f"{prefix}/operator/command",),
            subscribe=(f"{prefix}/operator/result/#", *published),
        ),
    }


@dataclass(frozen=True, slots=True)
class MqttCredentials:
    """A principal's user name and password (generated per run; never logged)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"MqttCredentials(username={self.username!r}, password=<redacted>)"


def generate_credentials() -> dict[str, MqttCredentials]:
    """Fresh random passwords (128 bits) for the three principals."""
    return {
        name: MqttCredentials(name, secrets.token_urlsafe(16))
        for name in (CONTROLLER, TELEMETRY, OPERATOR)
    }


def write_password_file(
    path: Path,
    credentials: dict[str, MqttCredentials],
    *,
    time_cost: int = 3,
    memory_cost_kib: int = 65_536,
) -> Path:
    """Write `user:argon2-hash` lines (amqtt FileAuthPlugin format), mode 0600.

    The argon2 cost defaults are argon2-cffi's (3 passes over 64 MiB); tests pass lower ones
    (a broker verifies every CONNECT at the cost stored in the hash)."""
    hasher = PasswordHash((Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost_kib),))
    return _write_private(path, {c.username: hasher.hash(c.password) for c in credentials.values()})


def read_password_lines(path: Path) -> dict[str, str]:
    """The `user:hash` lines of a password file, by user (blank and `#` lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, digest = line.partition(":")
        if not sep or not user or not digest:
            raise ValueError(f"{path}: a line is not user:hash (user {user!r})")
        out[user] = digest
    return out


def _write_private(path: Path, lines: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("".join(f"{user}:{digest}\n" for user, digest in lines.items()))
    return path


def add_user(path: Path, username: str, password: str) -> Path:
    """Add or replace one principal in a password file (argon2 hash), mode 0600."""
    if not username or ":" in username or not password:
        raise ValueError("a user name without ':' and a non-empty password are required")
    lines = read_password_lines(path) if path.exists() else {}
    lines[username] = PasswordHash((Argon2Hasher(),)).hash(password)
    return _write_private(path, lines)


def runtime_password_file(source: Path, target: Path) -> MqttCredentials:
    """Copy the operator's password file to `target` with a fresh controller principal.

    The controller's password is random per run (it never has to be configured or stored);
    a `voltpool` line in `source` is replaced. Returns the controller's credentials."""
    lines = read_password_lines(source)
    controller = MqttCredentials(CONTROLLER, secrets.token_urlsafe(16))
    lines[CONTROLLER] = PasswordHash((Argon2Hasher(),)).hash(controller.password)
    _write_private(target, lines)
    return controller


def amqtt_plugins(password_file: Path, prefix: str) -> dict[str, object]:
    """The amqtt `plugins` section: password file authentication and topic ACLs."""
    rules = acl(prefix)
    return {
        "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file)},
        "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
            "publish_acl": {name: list(r.publish) for name, r in rules.items()},
            "acl": {name: list(r.subscribe) for name, r in rules.items()},
        },
    }


def mosquitto_acl_rules(text: str) -> dict[str, set[tuple[str, str]]]:
    """Parse a Mosquitto acl_file into user -> {(access, topic)} (for the consistency test)."""
    out: dict[str, set[tuple[str, str]]] = {}
    user = ""
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            out.setdefault(user, set())
        elif words[0] == "topic" and len(words) == 3:
            out[user].add((words[1], words[2]))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m adapters.security.mqtt_acl FILE USER`: add USER to the embedded broker's
    password file, the password read from the environment variable `MQTT_PASSWORD` or, when it
    is not set, from standard input (never from the command line, which `ps` shows)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in (TELEMETRY, OPERATOR):
        print(f"usage: python -m adapters.security.mqtt_acl FILE {{{TELEMETRY}|{OPERATOR}}}")
        return 2
    password = os.environ.get("MQTT_PASSWORD") or sys.stdin.readline().rstrip("\n")
    add_user(Path(args[0]), args[1], password)
    print(f"{args[1]} written to {args[0]} (argon2, mode 0600)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
