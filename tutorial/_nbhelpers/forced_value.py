"""A widget whose value another choice may force (a router that needs k = 1): while forced it shows the forced
value, greyed out; released, it gets the student's own value back. Notebooks 01 and 05 use it for top_k."""


class ForcedValue:
    def __init__(self, control):
        self.control = control
        self.chosen = control.value          # the student's own value, kept while another is forced

    def settle(self, forced) -> bool:
        """Apply ``forced`` (None: nothing forced). False when this call changed the control's value, which runs its
        observers (the notebook's on_change) again; True when the control already shows the value in use."""
        control = self.control
        if forced is None and control.disabled:                     # released: give the student's value back
            control.disabled = False
            if control.value != self.chosen:
                control.value = self.chosen
                return False
        if forced is None:
            self.chosen = control.value
        control.disabled = forced is not None
        if forced is not None and control.value != forced:
            control.value = forced                                  # show the value in use
            return False
        return True
