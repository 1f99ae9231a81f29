"""Where units sit and how the dial opens them: scores, gates, the unit map and the dial's value."""
