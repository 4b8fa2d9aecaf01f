"""Sending email over SMTP (aiosmtplib), telling a sure failure from an uncertain one; or
writing it to a local mailbox file instead (`credits demo`)."""

from __future__ import annotations

import mailbox
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from infra.settings import Settings
from service_layer.notifications import Undelivered


def email_message(sender: str, to_address: str, subject: str, body: str, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to_address
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message.set_content(body)
    return message


class MailboxFileMailer:
    """Writes each notification to a local mbox file instead of sending it (no SMTP server):
    open it with any mail reader, or `python3 -m mailbox`-style tools."""

    def __init__(self, path: Path, sender: str) -> None:
        self.path = Path(path)
        self.sender = sender

    async def send(self, to_address: str, subject: str, body: str, message_id: str) -> None:
        box = mailbox.mbox(self.path)
        try:
            box.lock()
            box.add(email_message(self.sender, to_address, subject, body, message_id))
            box.flush()
        finally:
            box.unlock()
            box.close()


class SmtpMailer:
    def __init__(self, settings: Settings) -> None:
        if not settings.smtp_host:
            raise ValueError("SMTP_HOST is not set")
        self.settings = settings

    async def send(self, to_address: str, subject: str, body: str, message_id: str) -> None:
        """Deliver one message. Raises Undelivered saying whether it may be tried again, and
        whether the server might have got it all the same (then it must not be)."""
        s = self.settings
        message = email_message(s.smtp_from, to_address, subject, body, message_id)
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout_seconds,
            use_tls=s.smtp_security == "tls",
            start_tls=True if s.smtp_security == "starttls" else False,
        )
        sending = False
        try:
            await client.connect()
            if s.smtp_username:
                await client.login(s.smtp_username, s.smtp_password.get_secret_value() if s.smtp_password else "")
            sending = True
            await client.sendmail(s.smtp_from, [to_address], message.as_bytes())
        except aiosmtplib.SMTPRecipientsRefused as error:
            # 4xx (greylisting, a full mailbox) is worth another try; 5xx is final.
            temporary = all(400 <= refused.code < 500 for refused in error.recipients)
            raise Undelivered(f"recipient refused: {error}", retry=temporary, maybe_sent=False) from None
        except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPSenderRefused) as error:
            # Our configuration (login, SMTP_FROM), not this message: keep it for when it is fixed.
            raise Undelivered(
                f"{error.code} {error.message} (check the SMTP settings)", retry=True, maybe_sent=False, ours=True
            ) from None
        except aiosmtplib.SMTPResponseException as error:
            # The server answered: nothing was accepted. 4xx is worth another try, 5xx is not.
            raise Undelivered(
                f"{error.code} {error.message}", retry=400 <= error.code < 500, maybe_sent=False
            ) from None
        except (aiosmtplib.SMTPException, OSError) as error:
            if sending:
                # Lost mid-transaction: the server may have queued it. At most once: not again.
                raise Undelivered(f"connection lost while sending: {error}", retry=False, maybe_sent=True) from None
            raise Undelivered(
                f"cannot reach the SMTP server: {error}", retry=True, maybe_sent=False, ours=True
            ) from None
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except aiosmtplib.SMTPException:
                    client.close()
