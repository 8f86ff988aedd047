"""Static files of the web playground (HTML, JS, CSS), served by server/api/ui.py. No build step."""
