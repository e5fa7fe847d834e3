"""The monitor's six screens, one module each (shown in a ContentSwitcher)."""
