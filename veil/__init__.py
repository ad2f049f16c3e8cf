"""Veil: a confidential-computing gRPC mesh. The one import root of everything installed."""
