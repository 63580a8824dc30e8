"""Checking responses: maths answers, code run against tests in a sandbox, and which check applies to a prompt.

``checkers.py`` holds answer extraction and comparison (``verify_math``, ``verify_code``), ``sandbox/`` the
locked-down code runner (its API, launcher and runner), ``registry.py`` the verifier registry (``VERIFIERS``)
and the gold fields and categories of prompt records. The implicit score stage and task accuracy in
``evaluate/`` both use them.
"""
