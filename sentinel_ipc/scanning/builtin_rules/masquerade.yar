/*
 * Executables that pretend to be something else. These rules use the external
 * variables `extension` and `filename`, which Sentinel fills from the scan
 * request's metadata (the lowercased suffix with its dot, and the base name).
 */

rule Executable_With_Document_Extension
{
    meta:
        description = "Windows or Linux executable delivered under a document, image or media extension"
        severity = "high"
        author = "Sentinel"
    condition:
        (uint16(0) == 0x5A4D or uint32(0) == 0x464C457F) and
        (extension == ".pdf" or extension == ".doc" or extension == ".docx" or
         extension == ".xls" or extension == ".xlsx" or extension == ".ppt" or
         extension == ".pptx" or extension == ".rtf" or extension == ".txt" or
         extension == ".jpg" or extension == ".jpeg" or extension == ".png" or
         extension == ".gif" or extension == ".mp3" or extension == ".mp4" or
         extension == ".csv" or extension == ".odt")
}

rule Double_Extension_Executable_Name
{
    meta:
        description = "File name with a decoy document suffix followed by an executable one (invoice.pdf.exe)"
        severity = "medium"
        author = "Sentinel"
    condition:
        filename matches /\.(pdf|docx?|xlsx?|pptx?|rtf|txt|jpe?g|png|gif|zip)\.(exe|scr|com|pif|bat|cmd|vbs|js|jse|hta|lnk)$/is
}
