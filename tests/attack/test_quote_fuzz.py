"""The DCAP quote parser and verifier against random bytes, mutations and splices of real quotes.

Rule: every refusal is a `QuoteError` subclass with a reason (never an IndexError, ValueError or
anything else), and nothing is accepted unless it says exactly what the unmutated quote says.
The corpus is the four real Intel quotes of `../shared/testdata/sgx-quotes/` (quote A also
with its collateral) and one sim quote under the dev root.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.attack.enclave_world import sim_quotes
from tests.attack.profile import attack_settings
from tests.attack.targets import QuoteCase, check_quote, fix_lengths, quote_corpus, quote_input
from veil.verify import QuoteError

# Region boundaries shared by every v3 quote: header | report body | sig length | sig data.
HEADER, BODY, SIG_LEN = (0, 48), (48, 432), (432, 436)


@pytest.fixture(scope="module")
def corpus(pki_dir: Path) -> list[QuoteCase]:
    return quote_corpus(pki_dir, sim_quotes(pki_dir).quote(bytes(range(64))))


def test_the_corpus_verifies_unmutated(corpus: list[QuoteCase]) -> None:
    # The oracle below compares against these verdicts; they must be real acceptances.
    assert [check_quote(case, case.raw) for case in corpus] == ["accepted-unchanged"] * len(corpus)
    assert {case.verdict["debug"] for case in corpus} == {True, False}  # quote B is a debug enclave


@attack_settings(2000)
@given(rng=st.randoms(use_true_random=True))
def test_mutated_quotes_raise_only_quote_errors(corpus: list[QuoteCase], rng: random.Random) -> None:
    parent, data = quote_input(rng, corpus)
    check_quote(parent, data)


@attack_settings(300)
@given(data=st.binary(max_size=6000))
def test_random_bytes_are_a_quote_error(corpus: list[QuoteCase], data: bytes) -> None:
    with pytest.raises(QuoteError) as refused:
        corpus[0].verify(data)
    assert refused.value.reason


def _regions(raw: bytes) -> dict[str, tuple[int, int]]:
    qe_auth = struct.unpack_from("<H", raw, 1012)[0]
    return {
        "header": HEADER,
        "report body": BODY,
        "ISV signature and attestation key": (436, 564),
        "QE report and signature": (564, 1012),
        "QE auth data": (1012, 1014 + qe_auth),
        "certification data": (1014 + qe_auth, len(raw)),
    }


@pytest.mark.parametrize("region", list(_regions(b"\0" * 1014 + b"\0\0")))
def test_every_region_spliced_from_another_real_quote_is_refused(
    corpus: list[QuoteCase], region: str
) -> None:
    # A host holding several genuine quotes recombines them: each region of quote X put into
    # quote Y (lengths fixed up, so the parser reads it) must fail some signature or binding.
    real = [case for case in corpus if case.collateral is None]
    refused = 0
    for target in real:
        for donor in real:
            if donor.raw == target.raw:
                continue
            start, end = _regions(target.raw)[region]
            d_start, d_end = _regions(donor.raw)[region]
            spliced = fix_lengths(target.raw[:start] + donor.raw[d_start:d_end] + target.raw[end:])
            if spliced == target.raw:
                continue  # identical region (e.g. the same Intel root and CA): not a forgery
            with pytest.raises(QuoteError):
                target.verify(spliced)
            refused += 1
    assert refused >= len(real)  # the identical-region skip must not hide the whole test
