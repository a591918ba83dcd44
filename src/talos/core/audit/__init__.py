"""The pure half of the audit log: Merkle tree hashing and proofs (RFC 9162).

Nothing here reads storage; the LMDB-backed log asks this package which
subtree hashes a proof needs and hands them back to be assembled and checked.
"""
