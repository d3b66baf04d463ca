"""The hospital site's ClientApp."""
