"""Starting and stopping the processes of a run on one machine: the policy servers (`servers.py`,
also used by `megagym eval` and `megagym cluster`), the local launcher (`local.py`), and checking a
configuration without starting anything (`dry_run.py`)."""
