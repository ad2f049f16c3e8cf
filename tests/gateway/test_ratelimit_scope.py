"""Rate-limit buckets are scoped: tenants' same-named keys and subjects, and one IPv6 /64."""

from __future__ import annotations

import hashlib

import pytest

from veil.services.gateway.auth import Credentials, parse_authenticators
from veil.services.gateway.ratelimit import RateLimited, RateLimiter, bucket_key


def _key(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def test_same_api_key_name_on_two_instances_has_two_buckets() -> None:
    # Two tenants each call their key "alice"; mallory holds tenant B's and floods.
    policy = parse_authenticators(
        {
            "default": {"type": "api_key", "keys": {"alice": _key("default-secret")}},
            "instances": {
                "tenant-a": {"type": "api_key", "keys": {"alice": _key("a-secret")}},
                "tenant-b": {"type": "api_key", "keys": {"alice": _key("b-secret")}},
            },
        }
    )
    limiter = RateLimiter(rate=0.001, burst=3)
    mallory = policy.authenticate("tenant-b", Credentials(None, {"x-api-key": "b-secret"}))
    for _ in range(3):
        limiter.acquire(mallory.key)
    with pytest.raises(RateLimited):
        limiter.acquire(mallory.key)
    alice = policy.authenticate("tenant-a", Credentials(None, {"x-api-key": "a-secret"}))
    assert (alice.key, mallory.key) == ("api-key:tenant-a:alice", "api-key:tenant-b:alice")
    limiter.acquire(alice.key)  # tenant A's alice is untouched
    # The default plugin's "alice" is a third principal, the same on every unlisted instance.
    other = policy.authenticate("x", Credentials(None, {"x-api-key": "default-secret"}))
    assert other.key == "api-key:*:alice"
    assert policy.authenticate("y", Credentials(None, {"x-api-key": "default-secret"})).key == other.key


def test_ipv6_peers_share_a_bucket_per_64() -> None:
    limiter = RateLimiter(rate=0.001, burst=2)
    # One host owning 2001:db8:1:2::/64 rotates its source address on every call.
    limiter.acquire("peer:ipv6:[2001:db8:1:2::1]")
    limiter.acquire("peer:ipv6:[2001:db8:1:2:ffff:ffff:ffff:fffe]")
    with pytest.raises(RateLimited):
        limiter.acquire("peer:ipv6:[2001:db8:1:2:dead:beef:0:1]")
    limiter.acquire("peer:ipv6:[2001:db8:1:3::1]")  # the neighbouring /64 is someone else
    limiter.acquire("peer:ipv4:192.0.2.1")
    limiter.acquire("peer:ipv4:192.0.2.2")


@pytest.mark.parametrize(
    ("client", "bucket"),
    [
        ("peer:ipv6:[2001:db8::1]", "peer:2001:db8::/64"),
        ("peer:ipv6:[fe80::1%eth0]", "peer:fe80::/64"),
        ("peer:ipv6:[::ffff:192.0.2.7]", "peer:192.0.2.7"),  # IPv4-mapped: the IPv4 host
        ("peer:ipv4:192.0.2.7", "peer:192.0.2.7"),
        ("peer:unix:/run/veil.sock", "peer:unix:/run/veil.sock"),
        ("api-key:tenant-a:alice", "api-key:tenant-a:alice"),
    ],
)
def test_bucket_keys(client: str, bucket: str) -> None:
    assert bucket_key(client) == bucket
