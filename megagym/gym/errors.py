"""`GymError`: Gym did not start, died, or could not be stopped (raised across the gym package)."""


class GymError(RuntimeError):
    """Gym did not start, died, or could not be stopped; the message names what and where."""
