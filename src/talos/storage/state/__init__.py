"""The parts of one agent's durable state, composed by ``talos.storage.agent_state``.

Each part owns some named databases of the shared LMDB environment (or some
rows of the ``agent`` database) and their row formats, and offers functions
that take an open transaction, so the writes of several parts go into one
commit:

* :mod:`.rows`      layout version, u64 keys, key validation, strict row decoding
* :mod:`.sealing`   the storage key: sealing values at rest, ``derive_storage_key``
* :mod:`.meta`      the ``agent`` database's format, key-check and counter rows
* :mod:`.commit`    the unit of work: state writes and audit entries in one transaction
* :mod:`.sessions`  ``sessions`` and the prekey row
* :mod:`.replay`    ``replay`` and the replay floor
* :mod:`.inbox`     ``inbox`` and its counter
* :mod:`.outbox`    ``outbox``, ``outbox_index`` and their counter
* :mod:`.peers`     ``peers`` (peer records and key event logs)
* :mod:`.receiving` the receive commit (replay, sessions, prekeys, inbox) and the
  in-memory replay window
* :mod:`.sending`   the send-side commits (outbox with the sessions that encrypted)

Rules the parts keep together:

* One transaction per operation: every mutation runs its writes inside
  ``AuditLog.append_with`` with the caller's audit records; all of them are
  on disk when it returns, or none is. An invalid audit record is refused
  before the transaction; ``QueueFull``, a duplicate, ``AuditFull`` or
  :class:`.commit.Unchanged` (a no-op) abort it.
* Nothing secret is on disk in the clear: sessions, prekeys, outbox payloads
  and inbox data are sealed, bound to their row. A sealed key-check row makes
  a wrong storage key a ``ConfigurationError`` at open, so a later tag
  failure means a damaged row.
* Every stored value is decoded strictly; a damaged one raises
  ``StoreCorrupted`` naming the database and key. No ``lmdb`` exception
  escapes (the audit log's transactions translate them).

Only :mod:`talos.storage.agent_state` imports these modules; everyone else
imports from there.
"""
