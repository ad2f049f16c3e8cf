"""Issue 13: `make bench-state` reports the enclave's memory at N token accounts. Small levels
here: each is restored in a real enclave runner, its balances read back through sealed queries,
and the numbers must add up."""

from __future__ import annotations

from pathlib import Path

from veil.dev.state_memory import measure

#: A balance record: "token" + "balance" + a 64-hex-character account, and an 8-byte amount.
RECORD_BYTES = 5 + 7 + 64 + 8


def test_memory_grows_with_the_accounts_and_they_are_all_there(pki_dir: Path, tmp_path: Path) -> None:
    report = measure([2_000, 10_000], pki_dir=pki_dir, platform_secret=tmp_path / "secret")
    small, large = report["levels"]
    assert (small["accounts"], large["accounts"]) == (2_000, 10_000)
    # Every record is in the enclave: what it accounts grows by exactly the added records
    # (the supply and the issuer's counter record change size by a few bytes at most).
    assert abs(large["accounted_bytes"] - small["accounted_bytes"] - 8_000 * RECORD_BYTES) <= 8
    for level in (small, large):
        assert level["accounted_bytes_per_account"] == round(level["accounted_bytes"] / level["accounts"], 1)
        assert RECORD_BYTES <= level["accounted_bytes_per_account"] < RECORD_BYTES + 1
        assert level["budget_bytes"] == report["budget_bytes"] == 96 * 1024 * 1024
        assert level["budget_used"] == round(level["accounted_bytes"] / level["budget_bytes"], 3)
        # Resident memory: Python objects cost more than the accounted bytes, but not absurdly.
        assert RECORD_BYTES < level["resident_bytes_per_account"] < 4_000
        assert level["peak_resident_bytes"] >= level["resident_bytes"] > level["resident_bytes_before"]
        assert level["snapshot_bytes"] > level["accounted_bytes"]
    assert large["resident_bytes"] > small["resident_bytes"]
    # Read back through sealed queries: accounts 0, 999 and 1,999; then 4,999 and 9,999 too.
    assert (small["balances_checked"], large["balances_checked"]) == (3, 5)
    assert report["accounts_within_budget"] == 96 * 1024 * 1024 // large["accounted_bytes_per_account"]


def test_a_budget_too_small_is_reported_not_hidden(pki_dir: Path, tmp_path: Path) -> None:
    report = measure([20_000], pki_dir=pki_dir, platform_secret=tmp_path / "secret", memory_mb=1)
    (level,) = report["levels"]
    assert "RESOURCE_EXHAUSTED" in level["refused"]
    assert level["budget_bytes"] == report["budget_bytes"] == 1024 * 1024
    assert level["state_bytes"] > 20_000 * RECORD_BYTES > level["budget_bytes"]
    assert not report["budget_is_the_state_host_default"]
    assert "accounts_within_budget" not in report
