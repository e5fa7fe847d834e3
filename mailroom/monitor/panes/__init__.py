"""The monitor's five screens, one module each (shown in a ContentSwitcher)."""
