"""Renders a notification's subject, plain-text and HTML bodies from the jinja2 files.

Templates live in services/notifier/templates/<locale>/<kind>.{subject.txt,txt,html};
HTML templates are autoescaped, and every value from a command is reduced to one line
of printable text first (see domain.messages.single_line).
"""

from __future__ import annotations

import pathlib

import jinja2

from services.notifier.domain.messages import RenderedEmail, resolve_locale, single_line
from services.notifier.domain.model import Notification

TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent.parent / "templates"


class TemplateRenderer:
    def __init__(self, directory: pathlib.Path = TEMPLATES_DIR) -> None:
        self._environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
        )

    def render(self, notification: Notification) -> RenderedEmail:
        locale = resolve_locale(notification.locale)
        course = single_line(notification.course_name) or single_line(notification.course_id)
        context = {
            "locale": locale,
            "name": single_line(notification.name),
            "course": course,
            "course_id": single_line(notification.course_id),
            "registration_id": single_line(notification.registration_id),
        }
        prefix = f"{locale}/{notification.kind.value.lower()}"
        subject = single_line(self._environment.get_template(f"{prefix}.subject.txt").render(context), 900)
        text = self._environment.get_template(f"{prefix}.txt").render(context)
        html = self._environment.get_template(f"{prefix}.html").render(context, subject=subject)
        return RenderedEmail(subject=subject, text=text, html=html)
