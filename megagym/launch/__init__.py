"""Starting and stopping the processes of a run on one machine (`local.py`) and checking a
configuration without starting anything (`dry_run.py`)."""
