"""The engine: reading the autograd graph, planning, the Promise System, the propagation loop and the ledger.

Imports flow one way: ``core`` imports nothing from ``ops``, ``rules`` or the applications. It defines the contracts
they implement — a registry row (:class:`~dynamiclrp.core.spec.OpSpec`), a compiled rule
(:class:`~dynamiclrp.core.step.Step`) and what the planner asks of a rule set
(:class:`~dynamiclrp.core.plan.RuleChooser`).
"""
