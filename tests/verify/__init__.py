"""Tests of the SGX DCAP quote verifier (real Intel vectors and a throwaway fake PKI)."""
