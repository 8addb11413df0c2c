"""Mail gateway: legacy POP3/SMTP devices in front of modern mail providers."""
